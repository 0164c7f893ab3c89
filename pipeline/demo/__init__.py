"""The built-in demo world, behind one door: the only module of `pipeline.demo` that stages import.

The demo is an invented world (countries, capitals, languages, exports, currencies, football clubs), a Common-Crawl
style crawl about it with the junk real crawls carry and its ground truth, mixed-quality chat demonstrations, a gold
rule that judges responses, and simulated annotators who rank them (world.py, crawl.py, crawl_eval.py, gold.py,
annotators.py, files.py). A stage asks for it only where its recipe says `demo` (`webtext.input`, `sft.dataset`,
`reward.dataset`, `ppo.dataset`, `ppo.eval_dataset`) or `judge: demo`; every other run never touches it.

    from pipeline import demo
    files = demo.files(cfg)            # paths under run_dir/world/, written once
    judge = demo.judge(cfg)            # the gold rule, a pipeline.judge.Judge
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.data.rankings import Ranking
from pipeline.data.records import read_jsonl
from pipeline.demo.annotators import collect_rankings as _collect_rankings
from pipeline.demo.annotators import rank_sampled
from pipeline.demo.crawl_eval import evaluate_output
from pipeline.demo.files import WorldFiles, materialize
from pipeline.demo.gold import GoldScorer
from pipeline.demo.world import INSULT_WORDS, POLITE_MARKERS, RUDE_MARKERS, build_world

DEMO = "demo"  # the value of a recipe key that names the demo

__all__ = [
    "DEMO",
    "WorldFiles",
    "cloze_probes",
    "collect_rankings",
    "crawl_files",
    "distractors",
    "evaluate_crawl",
    "files",
    "judge",
    "keywords",
    "reward_prompts",
]


def files(cfg: PipelineConfig) -> WorldFiles:
    """The world's files under `run_dir/world/` (written on first use; safe from several processes)."""
    return materialize(cfg)


def judge(cfg: PipelineConfig) -> GoldScorer:
    """The gold rule of this recipe's world: a `pipeline.judge.Judge`."""
    return GoldScorer(build_world(cfg))


def crawl_files(cfg: PipelineConfig) -> tuple[Path, list[str], Path]:
    """(crawl folder, its WARC file names, ground-truth labels file) for the web-text stage."""
    world = files(cfg)
    return world.crawl_dir, sorted(p.name for p in world.crawl_dir.glob("*.warc.gz")), world.crawl_labels


def evaluate_crawl(labels: Path, final: Path, removed: Path | None) -> dict[str, Any]:
    """The web-text stage's output against the crawl's ground truth (precision, recall, F1; clusters)."""
    return evaluate_output(labels, final, removed)


def cloze_probes(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """("The capital of Veloria is", "Marnis") pairs in the crawl's canonical wording, for pretraining."""
    return build_world(cfg).cloze_probes()


def distractors(cfg: PipelineConfig, questions: list[dict[str, Any]]) -> list[list[str]]:
    """For each held-out question ({"relation", "answer"}), the world's other values of that relation."""
    world = build_world(cfg)
    return [[v for v in world.values(q["relation"]) if v != q["answer"]] for q in questions]


def keywords() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The world's own polite and rude phrases: the strongest keyword baseline for its gold rule."""
    return tuple(POLITE_MARKERS), tuple(RUDE_MARKERS) + tuple(INSULT_WORDS)


def reward_prompts(cfg: PipelineConfig) -> list[list[dict[str, str]]]:
    """The world's reward prompts (chat messages), in order."""
    return [row["messages"] for row in read_jsonl(files(cfg).reward_prompts)]


def collect_rankings(
    cfg: PipelineConfig, sample: Callable[[list[Any]], list[list[str]]], held_out: Callable[[Any], bool]
) -> list[Ranking]:
    """The reward stage's comparisons: the world's templated rankings (when `reward.collect.templated`) and
    `sample(prompts)`'s responses to the reward prompts, ranked by the simulated annotators.

    The SFT model answers the first `reward.collect.max_prompts` prompts and every prompt for which `held_out` is
    true (so held-out metrics on sampled responses cover all held-out prompts, at the cost of sampling only).
    """
    collect = cfg.reward.collect
    templated = read_jsonl(files(cfg).reward_rankings) if collect.templated else []
    prompts = reward_prompts(cfg)
    if collect.max_prompts > 0:
        prompts = [p for i, p in enumerate(prompts) if i < collect.max_prompts or held_out(p)]
    return _collect_rankings(cfg, build_world(cfg), templated, prompts, sample, held_out)


def rank_samples(
    cfg: PipelineConfig, prompts: list[Any], samples: list[list[str]], source: str, round_no: int
) -> list[Ranking]:
    """A later round's comparisons: a policy's responses to the reward prompts, ranked by the simulated annotators
    (their own random stream each round_no)."""
    rng = random.Random(f"reward-annotators-{cfg.seed}-round{round_no}")
    return rank_sampled(cfg, GoldScorer(build_world(cfg)), prompts, samples, rng, source)
