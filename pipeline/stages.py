"""The stage registry: the pipeline's stages in order, the module of each, its help line and the metrics that
`rlhf status` shows. Every other module (config, CLI, driver, report, publishing) takes the stages from here.

A stage module exposes `resolve_inputs(cfg) -> dict[str, str]` (what its result depends on) and
`run(cfg, rerun=False) -> Path` (its `final/`). The stages that iterated RLHF repeats (reward and PPO, `rounds:` in
the recipe) take a `round_no` keyword too; round r >= 2 of a stage is named `<stage>-<r>` (`reward-2`, `ppo-2`), which
is also its folder in the run directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pipeline.errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command, the recipe section and the run-directory folder
    module: str
    help: str
    key_metrics: tuple[str, ...]  # dotted paths into stage.json's metrics


REGISTRY = (
    Stage("webtext", "pipeline.webtext.stage", "stage 1a: extract, filter and deduplicate web text into parquet shards",
          ("documents_read", "documents_kept", "eval.filter.f1")),
    Stage("pretrain", "pipeline.pretrain", "stage 1b: train a tokenizer and pretrain a causal LM on the filtered corpus",
          ("perplexity", "perplexity_ratio_unigram", "cloze_accuracy")),
    Stage("sft", "pipeline.sft", "stage 2: LoRA / QLoRA supervised fine-tuning on chat demonstrations",
          ("eval_loss", "heldout_accuracy", "dispreferred_share")),
    Stage("reward", "pipeline.reward.stage", "stage 3: reward model from rankings with ties",
          ("test.templated.accuracy", "test.sampled.accuracy", "test.all.accuracy", "test.all.kendall_tau")),
    Stage("ppo", "pipeline.ppo.loop", "stage 4: PPO of the policy against the reward model",
          ("gold_win_rate", "kl_to_reference", "sft_insult_rate", "ppo_insult_rate")),
)  # fmt: skip
STAGES = tuple(stage.name for stage in REGISTRY)
BY_NAME = {stage.name: stage for stage in REGISTRY}
ROUNDED = ("reward", "ppo")  # the stages each round of iterated RLHF runs again


def stage_name(stage: str, round_no: int = 1) -> str:
    """`reward`, `reward-2`, ...: the name (and run-directory folder) of a stage in a round."""
    return stage if round_no == 1 else f"{stage}-{round_no}"


def split_stage(name: str) -> tuple[str, int]:
    """`reward-2` -> ("reward", 2); a name without a round -> (name, 1)."""
    stage, sep, number = name.rpartition("-")
    if sep and stage in ROUNDED and number.isdigit() and int(number) >= 2:
        return stage, int(number)
    return name, 1


def check_stage(name: str) -> Stage:
    """The registered stage of a name (`reward-2` is the reward stage); anything else is a one-line error."""
    stage, _ = split_stage(name)
    if stage not in BY_NAME:
        rounds = f"; rounds >= 2 of {' and '.join(ROUNDED)} are named like {ROUNDED[0]}-2"
        raise UserError(f"unknown stage '{name}' (valid stages: {', '.join(STAGES)}{rounds})")
    return BY_NAME[stage]


def pipeline_stages(rounds: int = 1) -> list[str]:
    """Every stage of a run, in order: the five, then reward and PPO again for each further round."""
    return [*STAGES, *(stage_name(stage, r) for r in range(2, rounds + 1) for stage in ROUNDED)]


def stage_module(name: str) -> ModuleType:
    """The module that runs a stage (imported on demand: each pulls in torch, datatrove or trl)."""
    return importlib.import_module(check_stage(name).module)


def round_arguments(name: str) -> dict[str, int]:
    """The keyword arguments that pick a stage's round: {"round_no": r} for a later round, nothing for the first."""
    _, round_no = split_stage(name)
    return {"round_no": round_no} if round_no > 1 else {}
