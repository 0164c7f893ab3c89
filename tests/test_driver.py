"""The driver's stage selection and command-line errors (end-to-end driver runs are in tests/test_pipeline.py)."""

import pytest

from pipeline.cli import main
from pipeline.driver import select_stages
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
