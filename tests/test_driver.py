"""The driver's stage selection and command-line errors (end-to-end driver runs are in tests/test_pipeline.py)."""

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config, save_config
from pipeline.driver import NOT_NEEDED, needed_stages, run_pipeline, select_stages
from pipeline.errors import UserError


def test_select_stages_with_rounds_adds_reward_and_ppo_per_round():
    assert select_stages(None, None, None, rounds=3)[4:] == ["ppo", "reward-2", "ppo-2", "reward-3", "ppo-3"]
    assert select_stages("ppo", "reward-3", None, rounds=3) == ["ppo", "reward-2", "ppo-2", "reward-3"]
    assert select_stages(None, None, ["ppo-2", "sft"], rounds=2) == ["sft", "ppo-2"]


def test_select_stages_in_pipeline_order():
    assert select_stages(None, None, None) == ["webtext", "pretrain", "sft", "reward", "ppo"]
    assert select_stages("sft", None, None) == ["sft", "reward", "ppo"]
    assert select_stages(None, "pretrain", None) == ["webtext", "pretrain"]
    assert select_stages("pretrain", "reward", None) == ["pretrain", "sft", "reward"]
    assert select_stages(None, None, ["ppo", "webtext"]) == ["webtext", "ppo"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("sfft", None, None), "unknown stage 'sfft' (valid stages: webtext, pretrain, sft, reward, ppo; rounds"),
        (("reward-2", None, None), "stage 'reward-2' is not part of this recipe's 1 round(s)"),
        (("ppo", "webtext", None), "--from ppo comes after --until webtext"),
        (("sft", None, ["ppo"]), "--only cannot be combined"),
    ],
)
def test_bad_stage_selection_is_a_one_line_error(args, fragment):
    with pytest.raises(UserError) as info:
        select_stages(*args)
    assert fragment in str(info.value)


def test_status_of_a_non_run_directory_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["status", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a run directory" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------------
# Stages that nothing needs once a base is given

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def plan(tmp_path, capsys, *overrides):
    main(["run", str(DEMO), f"run_dir={tmp_path / 'run'}", *overrides, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()[1:]
    return {line.split()[0]: line.split(None, 1)[1] for line in lines}


def test_without_a_base_every_stage_is_needed(tmp_path, capsys):
    rows = plan(tmp_path, capsys)
    assert list(rows) == ["webtext", "pretrain", "sft", "reward", "ppo"]
    assert all(row.startswith("new ") for row in rows.values())


@pytest.mark.parametrize(
    "overrides, not_needed",
    [
        (["sft.base=Qwen/Qwen2.5-0.5B-Instruct"], ["webtext", "pretrain"]),
        (["pretrain.dataset={corpus}"], ["webtext"]),  # {corpus}: a text file the test writes
        (
            ["sft.base=org/chat", "reward.base=org/rm-base", "ppo.policy_base=org/policy"],
            ["webtext", "pretrain", "sft"],
        ),
        (["sft.base=org/chat", "ppo.reward_model=org/rm"], ["webtext", "pretrain", "reward"]),
        (["sft.base=org/chat", "ppo.ptx_coef=0.1"], ["pretrain"]),  # PPO-ptx reads the web text: webtext is needed
    ],
)
def test_stages_upstream_of_a_base_are_not_needed(tmp_path, capsys, overrides, not_needed):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some web text.\n")
    rows = plan(tmp_path, capsys, *(o.format(corpus=corpus) for o in overrides))
    assert [stage for stage, row in rows.items() if row.startswith("not needed")] == not_needed
    assert all(row.startswith("new ") for stage, row in rows.items() if stage not in not_needed)


def test_run_skips_stages_that_are_not_needed_and_status_shows_them(tmp_path, capsys):
    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}", "sft.base=org/chat"])
    save_config(cfg, tmp_path / "run" / "config.yaml")  # what `rlhf run` does first
    summary = run_pipeline(cfg, ["webtext", "pretrain"])
    assert {stage: info["action"] for stage, info in summary.items()} == {
        "webtext": NOT_NEEDED,
        "pretrain": NOT_NEEDED,
    }
    assert not (tmp_path / "run" / "webtext").exists() and not (tmp_path / "run" / "pretrain").exists()
    main(["status", str(tmp_path / "run")])
    rows = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["webtext"].startswith("not needed: no later stage reads its output (pretrain.dataset or sft.base")
    assert rows["pretrain"].startswith("not needed: no later stage reads its output (sft.base given)")
    assert rows["sft"].startswith("new") and rows["ppo"].startswith("new")


def test_a_stage_whose_inputs_are_not_resolved_keeps_every_stage_before_it(tmp_path, capsys):
    """ppo.dataset unset: what PPO reads is unknown, so nothing is 'not needed'; the error names the key."""
    with pytest.raises(SystemExit) as info:
        main(["run", str(DEMO), f"run_dir={tmp_path / 'run'}", "sft.base=org/chat", "ppo.dataset=null", "--dry-run"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ppo.dataset is not set")
    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}", "sft.base=org/chat", "ppo.dataset=null"])
    assert list(needed_stages(cfg)) == ["ppo", "webtext", "pretrain", "sft", "reward"]
