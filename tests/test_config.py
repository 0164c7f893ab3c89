"""Recipes load into typed configs; bad keys and values end in one-line errors naming the dotted key."""

import pytest

from pipeline.config import PipelineConfig, flatten, load_config, stage_settings
from pipeline.errors import UserError


def test_overrides_take_precedence_over_recipe_and_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_dir: runs/x\npretrain:\n  learning_rate: 0.01\n  max_seq_len: 64\n")
    cfg = load_config(recipe, ["pretrain.learning_rate=3e-4", "sft.lora.r=4"])
    assert cfg.run_dir == "runs/x"
    assert cfg.pretrain.learning_rate == pytest.approx(3e-4)  # CLI beats recipe
    assert cfg.pretrain.max_seq_len == 64  # recipe beats default
    assert cfg.sft.lora.r == 4
    assert cfg.sft.lora.alpha == PipelineConfig().sft.lora.alpha  # default kept


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "pretrain.learnig_rate=1",
            "unknown recipe key 'pretrain.learnig_rate' (did you mean 'pretrain.learning_rate'",
        ),
        ("pretrain.max_steps=abc", "pretrain.max_steps: expected an integer, got 'abc'"),
        ("sft.finetune=qlorax", "sft.finetune: 'qlorax' is not valid; choose one of lora, qlora, full"),
        ("world.toxic_share=1.5", "world.toxic_share: must be in [0, 1)"),
        ("world.forum_share=-0.1", "world.forum_share: must be in [0, 1)"),
        ("ppo.eval_samples_per_prompt=0", "ppo.eval_samples_per_prompt: must be >= 1"),
        ("reward.collect.fact_edits=-1", "reward.collect.fact_edits: must be >= 0"),
        ("sft.lora.r=0", "sft.lora.r: must be a positive integer"),
        ("ppo.tis_cap=0", "ppo.tis_cap: must be > 0"),
        ("ppo.rollout_engine=sglang", "ppo.rollout_engine: 'sglang' is not valid; choose one of hf, vllm"),
        ("pretrain=3", "'pretrain' must be a mapping"),
        ("nonsense", "is not key=value"),
        ("ppo.top_k=50", "ppo.top_k: must be 0 in PPO"),
        ("ppo.top_p=0.9", "ppo.top_p: must be 1.0 in PPO"),
        ("ppo.lora.modules_to_save=[lm_head]", "ppo.lora.modules_to_save: must be empty in PPO"),
        ("ppo.mixed_precision=fp16", "ppo.mixed_precision: 'fp16' is not valid; choose one of auto, no, bf16"),
        ("ppo.value_learning_rate=0", "ppo.value_learning_rate: must be > 0 or null"),
        ("ppo.kl_horizon=0", "ppo.kl_horizon: must be >= 1"),
        ("ppo.micro_batch_tokens=-1", "ppo.micro_batch_tokens: must be >= 0"),
        ("ppo.gradient_checkpointing=maybe", "ppo.gradient_checkpointing: expected"),
    ],
)
def test_bad_override_names_the_dotted_key(override, fragment):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_token_budget_with_gradient_accumulation_is_refused_naming_both():
    with pytest.raises(UserError, match=r"ppo.gradient_accumulation_steps: must be 1 with ppo.micro_batch_tokens"):
        load_config(None, ["ppo.micro_batch_tokens=4096", "ppo.gradient_accumulation_steps=2"])
    assert load_config(None, ["ppo.micro_batch_tokens=4096"]).ppo.micro_batch_tokens == 4096


def test_missing_and_malformed_recipes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_volatile_keys_do_not_enter_stage_settings():
    cfg = load_config(None, ["pretrain.logging_steps=7", "pretrain.save_steps=3"])
    settings = stage_settings(cfg, "pretrain")
    assert "pretrain.logging_steps" not in settings and "pretrain.save_steps" not in settings
    assert settings["pretrain.learning_rate"] == cfg.pretrain.learning_rate
    assert not any(key.startswith("sft.") for key in settings)
    # PPO's gradient checkpointing gives the same gradients bit for bit (tests/test_ppo_memory.py): memory only
    ppo = stage_settings(load_config(None, ["ppo.gradient_checkpointing=true"]), "ppo")
    assert "ppo.gradient_checkpointing" not in ppo and "ppo.micro_batch_tokens" in ppo


def test_flatten_joins_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
