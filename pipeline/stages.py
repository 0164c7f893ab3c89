"""The stage registry: the pipeline's stages in order, the module of each, its help line and the metrics that
`rlhf status` shows. Every other module (config, CLI, driver, report, publishing) takes the stages from here.

A stage module exposes `resolve_inputs(cfg) -> dict[str, str]` (what its result depends on) and
`run(cfg, rerun=False) -> Path` (its `final/`).
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


def check_stage(name: str) -> Stage:
    """The registered stage of that name; anything else is a one-line error listing the stages."""
    if name not in BY_NAME:
        raise UserError(f"unknown stage '{name}' (valid stages: {', '.join(STAGES)})")
    return BY_NAME[name]


def stage_module(name: str) -> ModuleType:
    """The module that runs a stage (imported on demand: each pulls in torch, datatrove or trl)."""
    return importlib.import_module(check_stage(name).module)
