"""The one reader of a user's records: jsonl, a JSON array, parquet, csv, a directory of them, or a Hub dataset id.

Every record comes with where it was found (`file.jsonl:12`, `file.parquet row 3`, `org/name[train] row 7`), so a
skipped or refused record is always named. A line that is not JSON becomes a `BadRecord` in place of its row (the
caller counts and skips it), and so does an object that repeats a key (`{"A": "x", "A": "y"}`: JSON would keep the last
silently), and a jsonl line that is not UTF-8 (a stray Latin-1 byte). A file that starts with a UTF-16 byte-order mark
(what Windows tools write) is read as UTF-16. Text that is not UTF-8 in a CSV file or a JSON array ends the read with
a one-line error naming the file and line (a record there may span lines). A CSV row with more cells than the header
(an unquoted comma) is a bad record, not a row with shifted columns. A .json file holding one object written over
several lines is one record. In a CSV file, a
conversation cell (`messages`, `conversations`, `prompt`, `chosen`, ...) holding a JSON list of messages is read as
that list, and a `responses` cell holding a JSON list (or label-keyed object) of strings as that.
SFT conversations, rankings, prompts (PPO, comparison collection) and PPO-ptx's corpus all read through here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
NAMED = 5  # skipped records named one by one in the log; the rest are counted
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BadRecord(ValueError):
    """A record that cannot be used. `kind` groups it in the skip report ("invalid JSON", "repeated label", ...);
    the message is the kind and, after a colon, the detail."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class SkipReport:
    """How many records were read, kept and skipped (by kind, with the first offending record of each kind)."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    named: list[str] = field(default_factory=list)  # the first NAMED skipped records, "where: kind: detail"

    def skip(self, where: str, error: BadRecord) -> None:
        self.skipped[error.kind] += 1
        self.first.setdefault(error.kind, f"{where}: {error}")
        if len(self.named) < NAMED:
            self.named.append(f"{where}: {error}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: kept all {self.kept} records"
        kinds = "; ".join(f"{n} {kind} (first: {self.first[kind]})" for kind, n in self.skipped.most_common())
        return f"{self.source}: kept {self.kept} of {self.read} records, skipped {self.n_skipped}: {kinds}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "first": dict(self.first),
            "named": list(self.named),
        }

    def log(self) -> None:
        """One line per named skipped record (the first few), then the summary with every count."""
        for line in self.named:
            logger.warning("skipped %s", line)
        (logger.warning if self.skipped else logger.info)("%s", self.summary())


def is_local(source: str | Path) -> bool:
    """Whether `source` names a local path (existing, or spelled like one) rather than a Hub dataset id."""
    text = str(source)
    path = Path(text).expanduser()
    return (
        path.exists()
        or text.startswith((".", "/", "~"))
        or any(text.lower().endswith(s) for s in SUFFIXES)
        or not _HUB_ID.match(text)
    )


def read_records(
    source: str | Path, what: str, split: str = "train", config: str | None = None
) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record of `source`: a file, a directory of files (sorted, recursively), or a Hub id.

    `what` names the recipe key in errors ("sft.dataset"). A Hub dataset is streamed, so a caller that stops early
    reads only what it needs.
    """
    if not str(source).strip():  # Path("") is the working directory: never read it by accident
        raise UserError(f"{what} is empty: give a {'/'.join(SUFFIXES)} file, a directory or a Hub id")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise UserError(f"{what}: {path} holds no {', '.join(SUFFIXES)} files")
        for file in files:
            yield from read_file(file, what)
    elif path.is_file():
        yield from read_file(path, what)
    elif is_local(source):
        raise UserError(
            f"{what}: file not found: {source} (give a {'/'.join(SUFFIXES)} file, a directory or a Hub id)"
        )
    else:
        yield from read_hub(str(source), what, split, config)


def read_file(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """The records of one file, by its suffix in any case (.jsonl and .json hold JSON lines, or a JSON array)."""
    suffix = path.suffix.lower()  # TRAIN.JSONL, as some Windows tools name files
    if suffix not in SUFFIXES:
        raise UserError(f"{what}: {path} is not a {', '.join(SUFFIXES)} file")
    if suffix == ".parquet":
        yield from _read_parquet(path, what)
    elif suffix == ".csv":
        yield from _read_csv(path, what)
    else:
        yield from _read_json(path, what)


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Windows tools (PowerShell's `>`, Notepad's "Unicode") write


def _read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a text file as UTF-8: a UTF-16 file (it starts with its byte-order mark) is converted."""
    raw = path.read_bytes()
    if not raw.startswith(_UTF16_BOMS):
        return raw
    try:
        return raw.decode("utf-16").encode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{what}: {path} starts with a UTF-16 byte-order mark but is not valid UTF-16; convert the file to UTF-8 "
            "(e.g. iconv -f utf-16 -t utf-8)"
        ) from None


def _decode(raw: bytes, path: Path, line: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what}: {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _repeated(key: _RepeatedKey) -> BadRecord:
    return BadRecord("repeated key", f"{str(key)!r} appears twice in one object (JSON would keep only the last)")


def _read_json(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    raw_lines = _read_bytes(path, what).split(b"\n")
    raw_lines[0] = raw_lines[0].removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    first = next((raw for raw in raw_lines if raw.strip()), b"")
    if first.lstrip().startswith(b"["):  # a JSON array of records (what `json.dump(rows)` writes)
        lines = [_decode(raw, path, n, what) for n, raw in enumerate(raw_lines, start=1)]
        yield from _read_json_array("\n".join(lines), path, what)
        return
    whole = _one_object(raw_lines)
    if whole is not None:  # one record written over several lines (json.dump(record, indent=2))
        yield f"{path}:1", whole
        return
    for n, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                f"{path}:{n}",
                BadRecord(
                    "not UTF-8",
                    f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} (convert the file to UTF-8, e.g. iconv -f latin1 "
                    "-t utf-8)",
                ),
            )
            continue
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", _DECODER.decode(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{n}", BadRecord("invalid JSON", f"{exc.msg} at column {exc.colno}")
        except _RepeatedKey as key:
            yield f"{path}:{n}", _repeated(key)


def _one_object(raw_lines: list[bytes]) -> Any:
    """The record of a file that holds one JSON object spread over lines (its first line alone is not JSON), or
    None when the file is not that (jsonl, or broken)."""
    first = next((raw for raw in raw_lines if raw.strip()), b"")
    if not first.lstrip().startswith(b"{") or _parses(first):
        return None
    try:
        return _DECODER.decode(b"\n".join(raw_lines).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, _RepeatedKey):
        return None


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _read_json_array(text: str, path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """Items of a JSON array, each named by the line it starts on."""
    plain = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            item, end = _DECODER.raw_decode(text, position)
        except _RepeatedKey as key:
            item, end = _repeated(key), plain.raw_decode(text, position)[1]
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{what}: {path}:{exc.lineno} is not valid JSON ({exc.msg}); the array is unreadable "
                "from there (fix it, or write one record per line as jsonl)"
            ) from None
        position = end
        yield f"{path}:{line}", item


def _read_csv(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    raw = _read_bytes(path, what)
    for n, line in enumerate(raw.split(b"\n"), start=1):
        _decode(line, path, n, what)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:  # DictReader files the cells past the header's under None: the columns have shifted
            yield (
                where,
                BadRecord(
                    "malformed CSV row",
                    f"{len(reader.fieldnames or []) + len(row[None])} cells where the header has "
                    f"{len(reader.fieldnames or [])} (quote cells that hold commas)",
                ),
            )
            continue
        yield where, {k: _json_messages(k, v) for k, v in row.items()}


_MESSAGE_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


def _json_messages(column: str | None, value: Any) -> Any:
    """A CSV cell of a conversation column that holds a JSON list of message objects (what exporting a chat dataset
    to CSV writes) as that list, a `responses` cell holding a JSON list or object of strings as that; any other
    cell as its text."""
    if column == "responses" and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        strings = parsed.values() if isinstance(parsed, dict) else parsed if isinstance(parsed, list) else [None]
        return parsed if all(isinstance(v, str) for v in strings) else value
    if column not in _MESSAGE_COLUMNS or not isinstance(value, str) or not value.lstrip().startswith("[{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value


def _read_parquet(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise UserError(f"{what}: {path} is not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def read_hub(dataset_id: str, what: str, split: str = "train", config: str | None = None) -> Iterator[tuple[str, Any]]:
    """The rows of a Hub dataset split, streamed."""
    import datasets

    try:
        rows = iter(datasets.load_dataset(dataset_id, name=config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing id, split or network
        raise UserError(
            f"{what}: cannot load {dataset_id!r} split {split!r}: {str(exc).splitlines()[0][:160]} "
            "(give a local .jsonl/.json/.parquet/.csv file or a Hub dataset id reachable from this machine)"
        ) from None
    if first is None:
        return
    yield f"{dataset_id}[{split}] row 0", first
    for i, row in enumerate(rows, start=1):
        yield f"{dataset_id}[{split}] row {i}", row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file the pipeline wrote itself (a bad line is an error, not a skip)."""
    rows = []
    for where, row in read_records(path, str(path)):
        if isinstance(row, BadRecord):
            raise UserError(f"{where}: {row}")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as jsonl, atomically (readers see the old file or the whole new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
