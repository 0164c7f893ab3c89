"""Collecting comparisons as InstructGPT did: K responses per prompt sampled from the SFT model, then ranked.

The K sampled responses to `reward.collect.prompts` are exported as ranking tasks (a CSV, see
`pipeline.data.rankings.export_ranking_tasks`) for people to fill in and import back. The demo ranks the same kind
of samples with its simulated annotators instead (`pipeline.demo`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import PipelineConfig
from pipeline.data.prompts import Prompt, read_prompts
from pipeline.data.rankings import Ranking, export_ranking_tasks
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs, generate
from pipeline.modeling import load_base_model
from pipeline.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def sample_responses(
    model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], k: int, sampling: Any, batch_size: int = 32
) -> list[list[str]]:
    """K sampled responses for each prompt (seed torch first for reproducible samples)."""
    repeated = [p for p in prompts for _ in range(k)]
    texts = generate(model, tokenizer, repeated, sampling, batch_size=batch_size).texts
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def load_policy(base: str, adapter: Path | None = None) -> tuple[torch.nn.Module, Any]:
    """The policy to sample from and its tokenizer: the SFT model (the stage's base, a causal LM), or with `adapter`
    a PPO policy's adapter merged into it."""
    model = load_base_model(base, AutoModelForCausalLM, what="reward.base")
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model, load_tokenizer(base)


def sampling_args(cfg: PipelineConfig) -> SamplingArgs:
    c = cfg.reward.collect
    return SamplingArgs(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)


def sample_for_prompts(
    cfg: PipelineConfig, base: str, prompts: list[Prompt], adapter: Path | None = None, seed: int | None = None
) -> list[list[str]]:
    """`reward.collect.responses_per_prompt` responses to each prompt of the SFT model (or of the policy whose
    adapter is given), seeded by the recipe (or `seed`)."""
    model, tokenizer = load_policy(base, adapter)
    torch.manual_seed(cfg.seed if seed is None else seed)
    return sample_responses(
        model,
        tokenizer,
        prompts,
        cfg.reward.collect.responses_per_prompt,
        sampling_args(cfg),
        cfg.reward.per_device_eval_batch_size,
    )


def collect_ranking_tasks(cfg: PipelineConfig, base: str, out: Path) -> Path:
    """Sample K responses per prompt of `reward.collect.prompts` and export them as ranking tasks (CSV) for people."""
    collect = cfg.reward.collect
    if not collect.prompts:
        raise UserError("reward.dataset=collect needs reward.collect.prompts (a file of prompts to sample for)")
    records, _ = read_prompts(collect.prompts, "reward.collect.prompts")
    prompts = [r["prompt"] for r in records]
    if collect.max_prompts > 0:
        prompts = prompts[: collect.max_prompts]
    samples = sample_for_prompts(cfg, base, prompts)
    tasks = [Ranking(p, r, "", id=f"task-{n + 1}") for n, (p, r) in enumerate(zip(prompts, samples, strict=True))]
    return export_ranking_tasks(tasks, out)
