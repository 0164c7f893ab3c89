"""The reward stage's data: rankings collected or read, split by prompt, written once under `reward/comparisons/`,
encoded as one example per prompt (its K responses), and batched whole.

Demo (`reward.dataset=demo`): the world's prompts are split first, so that the SFT model answers every held-out
one; the templated and sampled responses are ranked by the simulated annotators (pipeline.demo). `collect`: sample
responses for `reward.collect.prompts` and export ranking tasks for people. Anything else is read by
`pipeline.data.rankings` in any of its formats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import demo
from pipeline.checkpoints import final_dir, stage_dir, write_json_atomic
from pipeline.config import PipelineConfig, RewardConfig
from pipeline.data.comparisons import collect_ranking_tasks, sample_for_prompts
from pipeline.data.prompts import prompt_key
from pipeline.data.rankings import (
    Ranking,
    export_ranking_tasks,
    read_rankings,
    strict_pairs,
    tied_pairs,
    tier_of,
    write_rankings,
)
from pipeline.errors import UserError
from pipeline.generation import renderable
from pipeline.modeling import encode_reward_inputs, right_pad
from pipeline.stages import stage_name

logger = logging.getLogger(__name__)

STAGE = "reward"
SPLITS = ("train", "validation", "test")


@dataclass
class RankingCollator:
    """Batches prompts with all their responses: K_1 + ... + K_B right-padded sequences, tiers and margins.

    Returns input_ids and attention_mask (sum K_b, L), tiers (B, max K_b) with -1 for padding, margin (B,).
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = right_pad([ids for f in features for ids in f["input_ids"]], self.pad_token_id)
        k = max(len(f["tiers"]) for f in features)
        tiers = torch.full((len(features), k), -1, dtype=torch.long)
        for b, f in enumerate(features):
            tiers[b, : len(f["tiers"])] = torch.as_tensor(f["tiers"], dtype=torch.long)
        margin = torch.tensor([float(f.get("margin", 0.0)) for f in features])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "tiers": tiers, "margin": margin}


def encode_rankings(records: list[Ranking], tokenizer: Any, rcfg: RewardConfig) -> list[dict[str, Any]]:
    """One training example per prompt: the token ids of its K responses, their tiers and the pair margin."""
    rows = []
    for r in records:
        ids = encode_reward_inputs(tokenizer, r.prompt, r.responses, rcfg.max_seq_len)
        row = {"input_ids": ids, "tiers": tier_of(r.tiers), "margin": rcfg.margin + r.margin}
        cut = 0
        if any(len(x) == rcfg.max_seq_len for x in ids):  # maybe cut: compare with the uncut lengths
            full = encode_reward_inputs(tokenizer, r.prompt, r.responses, 1 << 30)
            cut = sum(len(f) > len(x) for f, x in zip(full, ids, strict=True))
        rows.append({**row, "length": max(len(x) for x in ids), "truncated": cut})  # similar lengths pad less
    return rows


def assign_splits(keys: set[str], validation_share: float, test_share: float, seed: int) -> dict[str, str]:
    """Prompt key -> "validation" or "test" (absent: "train"), by a seeded hash of the key."""

    def rank(key: str) -> str:
        return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()

    ordered = sorted(keys, key=rank)
    n = len(ordered)
    n_test = max(1, round(n * test_share)) if test_share > 0 and n >= 3 else 0
    n_val = max(1, round(n * validation_share)) if validation_share > 0 and n >= 3 else 0
    return {k: "test" for k in ordered[:n_test]} | {k: "validation" for k in ordered[n_test : n_test + n_val]}


def split_by_prompt(
    records: list[Ranking], validation_share: float, test_share: float, seed: int, split_of: dict | None = None
) -> dict[str, list]:
    """Train/validation/test by prompt (every ranking of a prompt lands in one split), by a seeded hash."""
    if split_of is None:
        split_of = assign_splits({r.prompt_key() for r in records}, validation_share, test_share, seed)
    out: dict[str, list[Ranking]] = {name: [] for name in SPLITS}
    for r in records:
        out[split_of.get(r.prompt_key(), "train")].append(r)
    return out


def prepare_comparisons(cfg: PipelineConfig, base: str, round_no: int = 1) -> dict[str, Any]:
    """Collect or read the rankings and write `<stage>/comparisons/{train,validation,test}.jsonl` (once: a resumed
    run reuses them). A later round adds its new comparisons to the previous round's. Returns what was read and
    skipped."""
    rcfg, out = cfg.reward, stage_dir(cfg, stage_name(STAGE, round_no)) / "comparisons"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    summary: dict[str, Any] = {}
    split_of = None
    if round_no > 1:
        records, split_of, summary["new"] = later_round_records(cfg, base, round_no)
    elif rcfg.dataset == demo.DEMO:  # split the world's prompts first: the SFT model answers every held-out one
        keys = {prompt_key(p) for p in demo.reward_prompts(cfg)}
        split_of = assign_splits(keys, rcfg.validation_share, rcfg.test_share, cfg.seed)
        records = demo.collect_rankings(
            cfg, lambda prompts: sample_for_prompts(cfg, base, prompts), held_out=lambda p: prompt_key(p) in split_of
        )
    else:
        records, skipped = read_rankings(
            rcfg.dataset,
            rcfg.dataset_format,
            rcfg.on_bad_record,
            rcfg.dataset_split,
            rcfg.dataset_config,
            rcfg.score_key,
        )
        summary["skipped"] = skipped.as_dict()
    if round_no == 1 and rcfg.max_records > 0 and len(records) > rcfg.max_records:
        records = random.Random(cfg.seed).sample(records, rcfg.max_records)
    splits = split_by_prompt(records, rcfg.validation_share, rcfg.test_share, cfg.seed, split_of)
    for name, rows in splits.items():
        write_rankings(rows, out / f"{name}.jsonl")
    summary["records"] = {name: len(rows) for name, rows in splits.items()}
    summary["pairs"] = {name: sum(len(strict_pairs(r.tiers)) for r in rows) for name, rows in splits.items()}
    summary["tied_pairs"] = {name: sum(len(tied_pairs(r.tiers)) for r in rows) for name, rows in splits.items()}
    write_json_atomic(out / "summary.json", summary)
    return summary


def later_round_records(cfg: PipelineConfig, base: str, round_no: int) -> tuple[list[Ranking], dict[str, str], dict]:
    """(every comparison so far, the prompt splits they keep, a count of the new ones) for round `round`: the
    previous round's comparisons, and the previous PPO policy's K responses to their prompts, ranked by the demo's
    annotators or, outside the demo, by people through a ranking-tasks file (see `round_tasks`)."""
    previous = stage_name(STAGE, round_no - 1)
    records = [r for name in SPLITS for r in read_split(cfg, name, previous)]
    split_of = {r.prompt_key(): name for name in SPLITS for r in read_split(cfg, name, previous) if name != "train"}
    prompts = list({prompt_key(r.prompt): r.prompt for r in records}.values())
    if cfg.reward.dataset == demo.DEMO:
        prompts = demo.reward_prompts(cfg)
    limit = cfg.reward.collect.max_prompts
    if limit > 0:  # as in the first round_no: the first prompts, and every held-out one
        prompts = [p for i, p in enumerate(prompts) if i < limit or prompt_key(p) in split_of]
    policy = final_dir(cfg, stage_name("ppo", round_no - 1))
    source = f"policy-{round_no - 1}"  # the responses of PPO round r-1's policy

    def sample(chosen: list[Any]) -> list[list[str]]:
        return sample_for_prompts(cfg, base, chosen, adapter=policy, seed=cfg.seed + 1000 * round_no)

    if cfg.reward.dataset == demo.DEMO:
        new = demo.rank_samples(cfg, prompts, sample(prompts), source, round_no)
    else:
        new = round_tasks(cfg, round_no, prompts, sample, source)
    return records + new, split_of, {"source": source, "records": len(new), "prompts": len(prompts)}


def round_tasks(cfg: PipelineConfig, round_no: int, prompts: list[Any], sample: Any, source: str) -> list[Ranking]:
    """Round `round`'s rankings by people: the first time, the previous policy's responses are sampled and exported
    to `run_dir/ranking_tasks-round<r>.csv` and the stage stops with what to do; once the file's `ranking` column is
    filled in, its rankings are read (rows left blank are skipped and counted)."""
    tasks = cfg.run_path / f"ranking_tasks-round{round_no}.csv"
    if not tasks.is_file():
        samples = sample(prompts)
        rows = [
            Ranking(p, r, "", id=f"round{round_no}-{n + 1}")
            for n, (p, r) in enumerate(zip(prompts, samples, strict=True))
        ]
        export_ranking_tasks(rows, tasks)
        raise UserError(
            f"round {round_no} needs rankings of the previous policy's responses: wrote {len(rows)} ranking tasks to "
            f"{tasks}; fill in its 'ranking' column (e.g. C > B > A = D), then run the same command again"
        )
    records, _ = read_rankings(tasks, "tasks", on_bad="skip", what=f"round {round_no} ranking tasks")
    return [dataclasses.replace(r, source=source) for r in records]


def export_tasks(cfg: PipelineConfig, base: str) -> None:
    """reward.dataset=collect: sample responses and write `run_dir/ranking_tasks.csv` for people; always raises
    a UserError that says what to do next (the stage cannot train before the rankings come back)."""
    tasks = cfg.run_path / "ranking_tasks.csv"
    if tasks.exists():  # people may be filling it in: never overwrite it
        raise UserError(
            f"ranking tasks were already exported to {tasks}: fill in its 'ranking' column and run with "
            f"reward.dataset={tasks} (move the file away to sample new tasks)"
        )
    collect_ranking_tasks(cfg, base, tasks)
    raise UserError(
        f"no rankings yet: wrote ranking tasks to {tasks}; fill in its 'ranking' column (e.g. C > B > A = D), "
        f"then run again with reward.dataset={tasks}"
    )


def drop_unrenderable(splits: dict[str, list[Ranking]], tokenizer: Any) -> tuple[dict[str, list[Ranking]], int]:
    """The splits without the rankings whose prompt the chat template refuses (Gemma 2: a system turn), and how many
    were skipped; the first is named in a warning."""
    out, skipped, first = {}, 0, None
    for name, records in splits.items():
        refusals = [renderable(tokenizer, r.prompt) for r in records]
        out[name] = [r for r, bad in zip(records, refusals, strict=True) if bad is None]
        skipped += len(records) - len(out[name])
        first = first or next((bad for bad in refusals if bad is not None), None)
    if first is not None:
        logger.warning("reward: %d rankings skipped, %s (the first: %s)", skipped, first.kind, first.detail)
    return out, skipped


def read_split(cfg: PipelineConfig, name: str, stage: str = STAGE) -> list[Ranking]:
    """The comparisons of one split that a reward stage (of any round) wrote."""
    path = stage_dir(cfg, stage) / "comparisons" / f"{name}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return read_rankings(path, "rankings", on_bad="error")[0]
