"""The run directory: finished stages are skipped, changed ones stop with the changed keys, nothing is lost."""

import pytest

from pipeline.checkpoints import (
    finishing,
    is_finished,
    mark_checkpoint_complete,
    newest_checkpoint,
    prepare_stage,
    prune_checkpoints,
    read_stage_json,
    stage_identity,
    write_stage_json,
)
from pipeline.config import load_config
from pipeline.errors import UserError


def _finish(cfg, stage="pretrain"):
    identity = stage_identity(cfg, stage, {})
    assert prepare_stage(cfg, stage, identity) is None
    with finishing(cfg, stage) as out:
        (out / "weights.bin").write_text("w")
        write_stage_json(out, identity, {"loss": 1.0}, contents="model")
    return identity


def test_finished_stage_with_same_settings_is_skipped(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    identity = _finish(cfg)
    final = prepare_stage(cfg, "pretrain", stage_identity(cfg, "pretrain", {}))
    assert final == tmp_path / "pretrain" / "final"
    assert read_stage_json(final)["config_hash"] == identity["config_hash"]
    assert sorted(p.name for p in final.iterdir()) == ["stage.json", "weights.bin"]


def test_changed_settings_stop_with_the_changed_key_and_keep_the_result(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    _finish(cfg)
    changed = load_config(None, [f"run_dir={tmp_path}", "pretrain.learning_rate=0.5"])
    with pytest.raises(UserError) as info:
        prepare_stage(changed, "pretrain", stage_identity(changed, "pretrain", {}))
    assert "pretrain.learning_rate (0.001 -> 0.5)" in str(info.value)
    assert "--rerun" in str(info.value) and "run_dir" in str(info.value)
    assert (tmp_path / "pretrain" / "final" / "weights.bin").read_text() == "w"
    # --rerun moves the finished stage aside instead of deleting it
    assert prepare_stage(changed, "pretrain", stage_identity(changed, "pretrain", {}), rerun=True) is None
    kept = list(tmp_path.glob("pretrain.replaced-*/final/weights.bin"))
    assert len(kept) == 1


def test_volatile_change_does_not_invalidate(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    _finish(cfg)
    relogged = load_config(None, [f"run_dir={tmp_path}", "pretrain.logging_steps=1"])
    assert prepare_stage(relogged, "pretrain", stage_identity(relogged, "pretrain", {})) is not None


def _as_an_older_checkout_recorded(identity, *missing):
    """The identity an older checkout, which had no `missing` keys yet, wrote for the same settings."""
    from pipeline.config import hash_settings

    settings = {k: v for k, v in identity["settings"].items() if k not in missing}
    upstream = {role: entry.get("config_hash") or entry["path"] for role, entry in identity["inputs"].items()}
    return {**identity, "settings": settings, "config_hash": hash_settings({"settings": settings, "inputs": upstream})}


def test_keys_added_since_a_run_was_recorded_count_as_unchanged_at_their_default(tmp_path):
    """A stage finished (or interrupted) under an older checkout that lacked some keys is kept (or resumed) when each
    new key holds its default here, the value that run had in effect; a new key set otherwise is a change."""
    import json

    from pipeline.checkpoints import same_stage, write_json_atomic

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    new = stage_identity(cfg, "pretrain", {})
    old = _as_an_older_checkout_recorded(new, "pretrain.learning_rate", "pretrain.warmup_ratio")
    assert old["config_hash"] != new["config_hash"] and same_stage(old, new, cfg)
    other = load_config(None, [f"run_dir={tmp_path}", "pretrain.learning_rate=0.5"])
    assert not same_stage(old, stage_identity(other, "pretrain", {}), other)  # the added key is not at its default
    seeded = load_config(None, [f"run_dir={tmp_path}", "seed=8"])
    recorded = _as_an_older_checkout_recorded(stage_identity(seeded, "pretrain", {}), "pretrain.learning_rate")
    assert not same_stage(recorded, new, cfg)  # a key the old checkout had changed
    assert not same_stage({"config_hash": "0" * 16}, new, cfg)  # no settings recorded: nothing to compare

    # an unfinished stage recorded by the older checkout resumes; once finished it is kept, not refused
    (tmp_path / "pretrain").mkdir()
    write_json_atomic(tmp_path / "pretrain" / "identity.json", old)
    assert prepare_stage(cfg, "pretrain", new) is None
    assert json.loads((tmp_path / "pretrain" / "identity.json").read_text())["config_hash"] == new["config_hash"]
    with finishing(cfg, "pretrain") as out:
        (out / "weights.bin").write_text("w")
        write_stage_json(out, old, {"loss": 1.0}, contents="model")
    assert prepare_stage(cfg, "pretrain", new) == tmp_path / "pretrain" / "final"
    with pytest.raises(UserError, match=r"pretrain.learning_rate \(0.001 -> 0.5\)"):
        prepare_stage(other, "pretrain", stage_identity(other, "pretrain", {}))


def test_upstream_change_invalidates_downstream(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    _finish(cfg, "pretrain")
    upstream = tmp_path / "pretrain" / "final"
    before = stage_identity(cfg, "sft", {"base": upstream})
    import json

    record = json.loads((upstream / "stage.json").read_text())
    record["config_hash"] = "different"
    (upstream / "stage.json").write_text(json.dumps(record))
    after = stage_identity(cfg, "sft", {"base": upstream})
    assert before["config_hash"] != after["config_hash"]


def test_incomplete_checkpoints_are_ignored_and_newest_is_kept(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (10, 20):
        mark_checkpoint_complete(tmp_path / f"checkpoint-{step}", step)
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"  # checkpoint-30 was cut off mid-save
    prune_checkpoints(tmp_path, keep=1)
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert not (tmp_path / "checkpoint-10").exists()
    assert (tmp_path / "checkpoint-30").exists()  # may still be being written; newer than the newest complete


def test_crash_before_stage_json_leaves_no_final(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    identity = stage_identity(cfg, "pretrain", {})
    prepare_stage(cfg, "pretrain", identity)
    with pytest.raises(RuntimeError):
        with finishing(cfg, "pretrain") as out:
            (out / "weights.bin").write_text("half")
    assert not is_finished(tmp_path / "pretrain" / "final")
    assert not (tmp_path / "pretrain" / "final").exists()


def test_result_whose_weights_are_empty_never_becomes_final(tmp_path):
    """An un-gathered ZeRO-3 save writes tensors of shape (0,): the stage fails with the fix, and no final/ appears."""
    import torch
    from safetensors.torch import save_file

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    identity = stage_identity(cfg, "sft", {})
    prepare_stage(cfg, "sft", identity)
    with pytest.raises(UserError, match="holds no weights.*zero3_save_16bit_model"):
        with finishing(cfg, "sft") as out:
            save_file({"lora_A": torch.zeros(0), "lora_B": torch.zeros(0)}, str(out / "adapter_model.safetensors"))
            write_stage_json(out, identity, {}, contents="adapter")
    assert not (tmp_path / "sft" / "final").exists()

    with finishing(cfg, "sft") as out:  # the same with real weights finishes
        save_file({"lora_A": torch.ones(2, 3)}, str(out / "adapter_model.safetensors"))
        write_stage_json(out, identity, {}, contents="adapter")
    assert is_finished(tmp_path / "sft" / "final")


def test_identity_does_not_depend_on_how_run_dir_is_spelled(tmp_path, monkeypatch):
    """`run_dir=runs/demo` and its absolute spelling are the same run: inputs inside it hash relative to it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "world").mkdir(parents=True)
    relative = load_config(None, ["run_dir=runs/demo"])
    absolute = load_config(None, [f"run_dir={tmp_path / 'runs' / 'demo'}"])
    one = stage_identity(relative, "sft", {"dataset": "runs/demo/world"})
    two = stage_identity(absolute, "sft", {"dataset": tmp_path / "runs" / "demo" / "world"})
    assert one["config_hash"] == two["config_hash"]
    other = stage_identity(absolute, "sft", {"dataset": tmp_path / "runs"})  # a different input still counts
    assert other["config_hash"] != two["config_hash"]
