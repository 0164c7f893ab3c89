"""Collecting comparisons as InstructGPT did: K responses per prompt sampled from the SFT model, then ranked.

- Demo (`reward.dataset=demo`): the world's reward prompts; the SFT model's K sampled responses are ranked by the
  simulated annotators (`pipeline.data.gold.rank_responses`: gold rule, noise and ties from `world:`), next to the
  world's templated responses, which the annotators ranked when the world was made. Every record also carries its
  noise-free gold ranking, which evaluation compares against (training sees only the annotators' rankings).
- Real use (`reward.dataset=collect`): the K sampled responses to `reward.collect.prompts` are exported as ranking
  tasks (a CSV, see `pipeline.data.rankings.export_ranking_tasks`) for people to fill in and import back.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig
from pipeline.data.rankings import BadRecord, Ranking, check_prompt, export_ranking_tasks
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[list[dict[str, str]] | str]:
    """Prompts from a jsonl file of {"messages": [...]} (cut after the last user turn) or {"prompt": ...} rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path} (give a jsonl file with a 'messages' or 'prompt' per line)")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt: Any = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
            if isinstance(prompt, list):
                last_user = max((i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"),
                                default=-1)  # fmt: skip
                prompt = prompt[: last_user + 1]
            prompts.append(check_prompt(prompt))
        except (json.JSONDecodeError, AttributeError, BadRecord) as exc:
            raise UserError(
                f"{path} line {n + 1}: not a prompt record ({exc}); expected 'messages' or 'prompt'"
            ) from None
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def sample_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]] | str],
    k: int,
    sampling: Any,
    batch_size: int = 32,
) -> list[list[str]]:
    """K sampled responses for each prompt (seed torch first for reproducible samples)."""
    from pipeline.generation import generate

    repeated = [p for p in prompts for _ in range(k)]
    texts = generate(model, tokenizer, repeated, sampling, batch_size=batch_size).texts
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def load_policy(base: str) -> tuple[torch.nn.Module, Any]:
    """The SFT model (the stage's base, a causal LM) and its tokenizer, for sampling."""
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import load_base_model
    from pipeline.tokenizer import load_tokenizer

    return load_base_model(base, AutoModelForCausalLM, what="reward.base"), load_tokenizer(base)


def sampling_args(cfg: PipelineConfig) -> Any:
    from pipeline.generation import SamplingArgs

    c = cfg.reward.collect
    return SamplingArgs(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)


def demo_prompts(cfg: PipelineConfig) -> list[list[dict[str, str]]]:
    """The world's reward prompts (chat messages), in order."""
    from pipeline.data.world import materialize, read_jsonl

    return [row["messages"] for row in read_jsonl(materialize(cfg).reward_prompts)]


def collect_demo_rankings(
    cfg: PipelineConfig, base: str, held_out: Callable[[Any], bool] = lambda p: False
) -> list[Ranking]:
    """Templated and SFT-sampled responses to the world's reward prompts, ranked by the simulated annotators.

    The SFT model answers the first `reward.collect.max_prompts` prompts and every prompt for which `held_out` is
    true (so held-out metrics on sampled responses cover all held-out prompts, at the cost of sampling only).
    """
    from pipeline.data.gold import GoldScorer, rank_responses
    from pipeline.data.world import build_world, materialize, read_jsonl

    world, files, collect = build_world(cfg), materialize(cfg), cfg.reward.collect
    scorer = GoldScorer(world)
    noise, tie_margin = cfg.world.annotator_noise, cfg.world.annotator_tie_margin
    rng = random.Random(f"reward-annotators-{cfg.seed}")
    records = []
    if collect.templated:
        for row in read_jsonl(files.reward_rankings):
            question = row["prompt"][-1]["content"]
            gold = rank_responses(scorer, question, row["responses"], rng, 0.0, tie_margin)
            records.append(Ranking(row["prompt"], row["responses"], row["ranking"], source="templated",
                                   gold_ranking=gold))  # fmt: skip
    prompts = demo_prompts(cfg)
    if collect.max_prompts > 0:
        prompts = [p for i, p in enumerate(prompts) if i < collect.max_prompts or held_out(p)]
    model, tokenizer = load_policy(base)
    torch.manual_seed(cfg.seed)
    samples = sample_responses(model, tokenizer, prompts, collect.responses_per_prompt, sampling_args(cfg),
                               cfg.reward.per_device_eval_batch_size)  # fmt: skip
    for prompt, responses in zip(prompts, samples, strict=True):
        question = prompt[-1]["content"]
        ranking = rank_responses(scorer, question, responses, rng, noise, tie_margin)
        gold = rank_responses(scorer, question, responses, rng, 0.0, tie_margin)
        records.append(Ranking(prompt, responses, ranking, source="sampled", gold_ranking=gold))
    logger.info("demo comparisons: %d templated rankings, %d sampled ones (K=%d)",
                sum(r.source == "templated" for r in records), len(samples), collect.responses_per_prompt)  # fmt: skip
    return records


def collect_ranking_tasks(cfg: PipelineConfig, base: str, out: Path) -> Path:
    """Sample K responses per prompt of `reward.collect.prompts` and export them as ranking tasks (CSV) for people."""
    collect = cfg.reward.collect
    if not collect.prompts:
        raise UserError("reward.dataset=collect needs reward.collect.prompts (a jsonl file of prompts to sample for)")
    prompts = read_prompts(collect.prompts)
    if collect.max_prompts > 0:
        prompts = prompts[: collect.max_prompts]
    model, tokenizer = load_policy(base)
    torch.manual_seed(cfg.seed)
    samples = sample_responses(model, tokenizer, prompts, collect.responses_per_prompt, sampling_args(cfg),
                               cfg.reward.per_device_eval_batch_size)  # fmt: skip
    tasks = [Ranking(p, r, "", id=f"task-{n + 1}") for n, (p, r) in enumerate(zip(prompts, samples, strict=True))]
    return export_ranking_tasks(tasks, out)
