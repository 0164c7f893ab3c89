"""The one exception type for mistakes a user can fix: the CLI prints it as a single line, without a traceback.

Environment failures a user can also fix (a full disk, a read-only or forbidden run directory) become one such line
too (`environment_error`), naming the path."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A bad recipe key or value, a missing path, a malformed record, a finished run in the way.

    The message names what is wrong and how to fix it, on one line.
    """


_writing_to: list[Path] = []  # the stage directory being written, for errors that do not name their file


def note_output_dir(path: Path) -> None:
    """Record the directory a stage is writing into (named when a library's write error does not say where)."""
    _writing_to[:] = [Path(path)]


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def environment_error(exc: BaseException) -> str | None:
    """The one-line message for a full disk or a read-only / forbidden path behind `exc` (also when a library wraps
    the OSError, as torch's save does in a RuntimeError); None when `exc` is something else."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL + _READ_ONLY:
            path = cause.filename or (_writing_to[0] if _writing_to else "the run directory")
            if cause.errno in _DISK_FULL:
                return f"disk full while writing {path}: free some space (or set run_dir=... elsewhere) and run the same command to resume"
            return f"cannot write {path} ({cause.strerror.lower() if cause.strerror else 'read-only'}): make it writable or set run_dir=... to a writable directory"
        text = str(cause)
        if isinstance(cause, RuntimeError) and ("No space left on device" in text or "file write failed" in text):
            path = _writing_to[0] if _writing_to else "the run directory"
            return f"disk full while writing into {path}: free some space (or set run_dir=... elsewhere) and run the same command to resume"
        cause = cause.__cause__ or cause.__context__
    return None
