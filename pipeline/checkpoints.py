"""The run directory: where each stage writes, what a stage's result depends on, and how finished stages are
recognised, skipped or protected.

```
run_dir/config.yaml                      resolved config of the last command that went ahead
run_dir/<stage>/identity.json            what the in-progress or finished run of the stage was started with
run_dir/<stage>/checkpoint-<step>/       training checkpoints (complete once `checkpoint.done` is in it)
run_dir/<stage>/final/                   what the next stage reads; `final/stage.json` is written last
run_dir/<stage>.replaced-<time>/         a finished stage moved aside by --rerun (nothing finished is deleted)
```

Every stage opens with `begin_stage` (its identity, and whether it already finished) and closes with `finishing`:
`final/` appears atomically, since a stage saves into `final.partial/` and renames it once `stage.json` is in place,
so a crash never leaves a half-written `final/` for a later stage to read. Pre-emption is in `preemption.py`, the
Trainer glue in `trainers.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, config_to_dict, flatten, hash_settings, save_config, stage_settings
from pipeline.errors import UserError, note_output_dir
from pipeline.tracking import git_commit, hardware, on_main, package_versions

logger = logging.getLogger(__name__)

STAGE_JSON = "stage.json"
CHECKPOINT_DONE = "checkpoint.done"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def stage_dir(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.run_path / stage


def final_dir(cfg: PipelineConfig, stage: str) -> Path:
    return stage_dir(cfg, stage) / "final"


def is_finished(path: Path) -> bool:
    """True when `path` is a stage's `final/` with its `stage.json` (written last, so the rest is complete)."""
    return (path / STAGE_JSON).is_file()


def read_stage_json(path: Path) -> dict[str, Any]:
    """The `stage.json` of a finished stage directory (`final/`)."""
    file = path / STAGE_JSON
    if not file.is_file():
        raise UserError(f"{path} is not a finished stage (no {STAGE_JSON}); run that stage first")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # cut short by a crash, a full disk or a copy
        raise UserError(
            f"{file} is damaged ({type(exc).__name__} at byte {getattr(exc, 'pos', getattr(exc, 'start', 0))}); "
            f"restore it, or run the stage again with --rerun"
        ) from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Stage identity: what a stage's result depends on


def stage_identity(cfg: PipelineConfig, stage: str, inputs: dict[str, Path | str]) -> dict[str, Any]:
    """The settings and inputs that decide a stage's output, and their hash.

    `inputs` maps a role ("corpus", "base", ...) to a path or Hub id. A local input that is a finished stage
    contributes its own config hash, so re-running an upstream stage with other settings invalidates this one.
    """
    settings = stage_settings(cfg, stage)
    described = {}
    for role, value in sorted(inputs.items()):
        entry: dict[str, Any] = {"path": str(value)}
        path = Path(value)
        if is_finished(path):
            entry["config_hash"] = read_stage_json(path).get("config_hash")
        described[role] = entry
    upstream = {role: entry.get("config_hash") or _portable(inputs[role], cfg) for role, entry in described.items()}
    return {
        "stage": stage,
        "settings": settings,
        "inputs": described,
        "config_hash": hash_settings({"settings": settings, "inputs": upstream}),
    }


def _portable(value: Path | str, cfg: PipelineConfig) -> str:
    """An input as the hash sees it: a path inside the run directory, relative to it (so `runs/demo` and its absolute
    spelling are the same run); anything else (another path, a Hub id) as given. Lexical only: an input that does not
    exist yet (the demo world) must hash the same before and after it is written."""
    absolute = Path(os.path.abspath(value))
    try:
        return "run_dir/" + absolute.relative_to(os.path.abspath(cfg.run_path)).as_posix()
    except ValueError:
        return str(value)


def same_stage(old: dict[str, Any], new: dict[str, Any], cfg: PipelineConfig) -> bool:
    """True when a recorded identity (a finished stage's stage.json, an unfinished one's identity.json) describes
    the stage that `new` does: the same hash, or a hash that differs only by keys added to the pipeline after it was
    recorded, each holding its default here. Such a key did not exist for the recorded run, which therefore ran as
    its default does (e.g. ppo.ratio_level=token), so that run can be resumed or kept."""
    if old.get("config_hash") == new["config_hash"]:
        return True
    recorded, settings = old.get("settings"), new["settings"]
    if not isinstance(recorded, dict) or not isinstance(old.get("config_hash"), str):
        return False
    added = set(settings) - set(recorded)
    defaults = flatten(config_to_dict(PipelineConfig()))  # config_to_dict as stage_settings, so values compare
    if not added or any(key not in defaults or settings[key] != defaults[key] for key in added):
        return False
    kept = {key: value for key, value in settings.items() if key not in added}
    upstream = {role: e.get("config_hash") or _portable(e["path"], cfg) for role, e in new["inputs"].items()}
    return old["config_hash"] == hash_settings({"settings": kept, "inputs": upstream})


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two identities (settings, then inputs by role); a key the old one
    predates counts as holding its default there (what the older checkout did)."""
    keys = []
    old_s, new_s = old.get("settings", {}), new.get("settings", {})
    defaults = flatten(config_to_dict(PipelineConfig()))
    for key in sorted(set(old_s) | set(new_s)):
        before = old_s.get(key, defaults.get(key, "<unset>"))
        if before != new_s.get(key, "<unset>"):
            keys.append(f"{key} ({before!r} -> {new_s.get(key, '<unset>')!r})")
    old_i, new_i = old.get("inputs", {}), new.get("inputs", {})
    for role in sorted(set(old_i) | set(new_i)):
        if old_i.get(role) != new_i.get(role):
            keys.append(f"input '{role}' (upstream result changed)")
    return keys


def prepare_stage(cfg: PipelineConfig, stage: str, identity: dict[str, Any], rerun: bool = False) -> Path | None:
    """Decide what to do with a stage before it starts.

    Returns the existing `final/` when the stage already finished with the same identity (the caller skips it), or
    None when the stage should run (resuming from its checkpoints if they were made with the same identity).
    A finished or half-done stage with other settings stops with a one-line error, unless `rerun` is set: then it is
    moved aside to `<stage>.replaced-<time>/`, never deleted.
    """
    sdir, final = stage_dir(cfg, stage), final_dir(cfg, stage)
    note_output_dir(sdir)
    if is_finished(final):
        try:
            old = read_stage_json(final)
        except UserError:  # a damaged stage.json: --rerun (what its message advises) moves it aside like any other
            if not rerun:
                raise
            old = {}
        if same_stage(old, identity, cfg) and not rerun:
            return final
        if not rerun:
            changes = "; ".join(changed_keys(old, identity)) or "settings"
            raise UserError(
                f"stage '{stage}' already finished in {final} with other settings, changed: {changes}. "
                f"Use a new run_dir (run_dir=...) or pass --rerun to run '{stage}' again (the old result is kept)"
            )
        _move_aside(sdir)
    elif (sdir / "identity.json").is_file():
        old = json.loads((sdir / "identity.json").read_text())
        if not same_stage(old, identity, cfg):
            if not rerun:
                changes = "; ".join(changed_keys(old, identity)) or "settings"
                raise UserError(
                    f"stage '{stage}' has an unfinished run in {sdir} with other settings, changed: {changes}. "
                    f"Use a new run_dir (run_dir=...) or pass --rerun to start '{stage}' over (the old run is kept)"
                )
            _move_aside(sdir)
        elif rerun:
            _move_aside(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_path / "config.yaml")  # only now that the command goes ahead (a refusal leaves it)
    write_json_atomic(sdir / "identity.json", identity)
    return None


@contextlib.contextmanager
def identity_withdrawn_on_error(cfg: PipelineConfig, stage: str) -> Iterator[None]:
    """A stage that stops on an error (a bad input found while reading it, a full disk) before its first checkpoint
    leaves no identity behind, and run_dir/config.yaml as it was: the corrected command then starts afresh instead of
    being refused as 'other settings', and `rlhf status` does not call finished stages 'changed'."""
    path, config = stage_dir(cfg, stage) / "identity.json", cfg.run_path / "config.yaml"
    before = path.read_bytes() if path.is_file() else None
    config_before = config.read_bytes() if config.is_file() else None
    try:
        yield
    except (UserError, OSError, RuntimeError):  # not a pre-emption: work done so far (webtext's shards) is kept
        if newest_checkpoint(stage_dir(cfg, stage)) is None:
            with contextlib.suppress(OSError):  # a read-only or full disk may refuse this too; the error says so
                if before is None and path.is_file():
                    path.unlink()
                if config_before is None and config.is_file():
                    config.unlink()
                elif config_before is not None and config.read_bytes() != config_before:
                    write_bytes_atomic(config, config_before)
        raise


def begin_stage(
    cfg: PipelineConfig, stage: str, inputs: dict[str, Path | str], rerun: bool = False
) -> tuple[dict[str, Any], Path | None]:
    """The prelude of every stage: (its identity, the `final/` to return when it already finished, else None).

    The main process decides (`prepare_stage`); every process gets the same answer, or the same one-line error.
    """
    identity = stage_identity(cfg, stage, inputs)
    done = on_main(lambda: prepare_stage(cfg, stage, identity, rerun))
    if done is not None:
        logger.info("%s already finished with these settings: %s", stage, done)
    return identity, done


def wait_for_final(cfg: PipelineConfig, stage: str, identity: dict[str, Any], poll_s: float = 2.0) -> Path:
    """Wait (polling the file, no collective) until the stage's `final/` is there with this identity's hash: how the
    other processes of a launch wait for a stage that one process runs. If that process fails, the launcher ends
    them too."""
    final = final_dir(cfg, stage)
    while not (is_finished(final) and same_stage(read_stage_json(final), identity, cfg)):
        time.sleep(poll_s)
    return final


def _move_aside(sdir: Path) -> Path:
    target = sdir.with_name(f"{sdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = sdir.with_name(f"{sdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    sdir.rename(target)
    logger.warning("moved the previous %s to %s", sdir, target)
    return target


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(sdir: Path) -> list[Path]:
    """Complete checkpoints of a stage directory, oldest first."""
    found = []
    if sdir.is_dir():
        for child in sdir.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and (child / CHECKPOINT_DONE).is_file():
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def newest_checkpoint(sdir: Path) -> Path | None:
    """The newest complete `checkpoint-N/` whose files load (incomplete ones, e.g. from a crash during a save, are
    skipped; a damaged one, e.g. a safetensors file cut short by a full disk or a copy, is skipped with one warning
    naming it: resume falls back to the checkpoint before it)."""
    for path in reversed(list_checkpoints(sdir)):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        if path not in _warned_damaged:
            _warned_damaged.add(path)
            logger.warning("%s is damaged (%s); resuming from the checkpoint before it", path, damage)
    return None


_warned_damaged: set[Path] = set()


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files (None when every one is whole), read without loading a tensor:
    a safetensors file must be as long as its header says, a torch file a readable zip, a JSON file valid JSON."""
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        try:
            if file.suffix == ".safetensors":
                with file.open("rb") as f:
                    head = f.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else -1
                    header = json.loads(f.read(n)) if 0 < n <= file.stat().st_size else None
                if header is None:
                    return f"{file.name} has no complete header"
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if file.stat().st_size != 8 + n + end:
                    return f"{file.name} is {file.stat().st_size} bytes, its header says {8 + n + end}"
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
            return f"{file.name} does not load: {type(exc).__name__}"
    return None


def check_final_files(final: Path) -> None:
    """A finished stage's files are whole (read as `checkpoint_damage` reads a checkpoint's): a file cut short or
    damaged after the stage finished (a copy, a full disk) is a one-line error naming it, not a loader's traceback."""
    damage = checkpoint_damage(final)
    if damage is not None:
        raise UserError(f"{final} is damaged ({damage}); restore it, or run the stage again with --rerun")


def mark_checkpoint_complete(path: Path, step: int) -> None:
    """Called once everything of a checkpoint is on disk; before that, resume ignores the directory."""
    write_json_atomic(path / CHECKPOINT_DONE, {"step": step, "time": time.time()})


def prune_checkpoints(sdir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the newest) and incomplete leftovers."""
    complete = list_checkpoints(sdir)
    keep = max(1, keep)
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1] if complete else None
    for child in sdir.iterdir() if sdir.is_dir() else []:
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and not (child / CHECKPOINT_DONE).is_file():
            if newest is None or int(match.group(1)) < int(newest.name.split("-")[1]):
                shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Finishing a stage


@contextlib.contextmanager
def finishing(cfg: PipelineConfig, stage: str) -> Iterator[Path]:
    """Yield a scratch directory to save the stage's result into; on success it becomes `final/` in one rename.

    The caller writes `stage.json` last, with `write_stage_json`.
    """
    sdir = stage_dir(cfg, stage)
    partial = sdir / "final.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    if not is_finished(partial):
        raise RuntimeError(f"{partial} has no {STAGE_JSON}: a stage must call write_stage_json before finishing")
    check_weights_saved(partial)
    final = sdir / "final"
    if final.exists():  # an unfinished final/ from an older layout or a crash: it was never complete
        shutil.rmtree(final)
    os.replace(partial, final)


def check_weights_saved(directory: Path) -> None:
    """Every safetensors file under `directory` holds weights. A ZeRO-3 (or FSDP) save that did not gather the
    sharded parameters writes tensors of shape (0,): such a result must never become a `final/`."""
    from safetensors import safe_open

    for path in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            shapes = [fh.get_slice(name).get_shape() for name in fh.keys()]
        if not shapes or all(0 in shape for shape in shapes):
            raise UserError(
                f"{path} holds no weights (parameters sharded by ZeRO-3/FSDP were saved without gathering); set "
                "zero3_save_16bit_model: true (DeepSpeed) or fsdp_state_dict_type: FULL_STATE_DICT and run again"
            )


def write_stage_json(
    path: Path, identity: dict[str, Any], metrics: dict[str, Any], contents: str, extra: dict[str, Any] | None = None
) -> None:
    """Record a finished stage: identity, metrics, what `final/` holds, versions and hardware. Written last."""
    record = {
        "stage": identity["stage"],
        "config_hash": identity["config_hash"],
        "contents": contents,
        "inputs": identity["inputs"],
        "settings": identity["settings"],
        "metrics": metrics,
        "versions": package_versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    write_json_atomic(path / STAGE_JSON, record)


def stage_seconds(metrics: dict[str, Any]) -> float | None:
    """How long a finished stage took, from its stage.json metrics (stages name it after what they time)."""
    return next(
        (metrics[k] for k in ("seconds", "stage_seconds", "train_seconds", "train_runtime") if k in metrics), None
    )


def metric(metrics: dict[str, Any], path: str) -> Any:
    """A stage.json metric by dotted path ("test.templated.accuracy"); None when absent."""
    for part in path.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The run directory a stage folder lies in (`runs/demo` for `runs/demo/sft` or `runs/demo/sft/final/merged`),
    for errors that were given the one where the other was meant; None when none of its parents is one."""
    for parent in list(Path(path).resolve().parents)[:4]:
        if (parent / "config.yaml").is_file():
            return parent
    return None
