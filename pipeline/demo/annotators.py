"""The demo's simulated annotators: they rank K responses to a prompt by the gold rule, with ties and slips.

- `rank_responses`: one annotator's ranking "C > B > A = D" (ties within `world.annotator_tie_margin`, adjacent
  groups swapped with probability `world.annotator_noise`).
- `build_rankings`: the world's templated responses to its reward prompts, ranked when the world is written.
- `collect_rankings`: the reward stage's comparisons in the demo: the templated rankings and K responses sampled
  from the SFT model for the reward prompts, ranked by the annotators (InstructGPT's comparison collection). Every
  record also carries its noise-free gold ranking, which evaluation compares against (training sees only the
  annotators' rankings).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from typing import Any

from pipeline.config import PipelineConfig, WorldConfig
from pipeline.data.rankings import LABELS, Ranking
from pipeline.demo.gold import GoldScorer, word_pattern
from pipeline.demo.world import POLITE_CLOSINGS, POLITE_MARKERS, POLITE_OPENINGS, RELATIONS, RUDE_ANSWERS, World

logger = logging.getLogger(__name__)


def rank_responses(
    scorer: GoldScorer, prompt: str, responses: list[str], rng: random.Random, noise: float, tie_margin: float
) -> str:
    """A simulated annotator's ranking of `responses` (A = responses[0]), with ties and noise: "C > B > A = D".

    Responses whose gold scores are within `tie_margin` of the best of their group are tied. With probability
    `noise`, each pair of adjacent groups is swapped (an annotator's slip).
    """
    scores = [scorer.score(prompt, r) for r in responses]
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][0]] - scores[i] < tie_margin:
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in range(len(groups) - 1):
        if rng.random() < noise:
            groups[g], groups[g + 1] = groups[g + 1], groups[g]
    return " > ".join(" = ".join(LABELS[i] for i in sorted(group)) for group in groups)


def build_rankings(world: World, prompts: list[dict[str, Any]], wc: WorldConfig, rng: random.Random, k: int = 4):
    """Templated responses for each prompt, ranked by simulated annotators (rankings format)."""
    scorer = GoldScorer(world)
    rows = []
    for record in prompts:
        responses = world.templated_responses(record, rng, k)
        prompt = record["messages"][0]["content"]
        ranking = rank_responses(scorer, prompt, responses, rng, wc.annotator_noise, wc.annotator_tie_margin)
        rows.append({"prompt": record["messages"], "responses": responses, "ranking": ranking, "kind": record["kind"]})
    return rows


def collect_rankings(
    cfg: PipelineConfig,
    world: World,
    templated: list[dict[str, Any]],
    prompts: list[list[dict[str, str]]],
    sample: Callable[[list[Any]], list[list[str]]],
    held_out: Callable[[Any], bool] = lambda prompt: False,
) -> list[Ranking]:
    """The templated rankings (rows of reward_rankings.jsonl) and `sample(prompts)`'s responses, both ranked by the
    annotators, each with its noise-free gold ranking; and, with `reward.collect.fact_edits` and `tone_edits`, minimal
    pairs made from the rankings of prompts that are not `held_out` (held-out metrics see only real responses)."""
    scorer = GoldScorer(world)
    rng = random.Random(f"reward-annotators-{cfg.seed}")
    records = []
    for row in templated:
        question = row["prompt"][-1]["content"]
        gold = rank_responses(scorer, question, row["responses"], rng, 0.0, cfg.world.annotator_tie_margin)
        records.append(Ranking(row["prompt"], row["responses"], row["ranking"], source="templated", gold_ranking=gold))
    samples = sample(prompts)
    records += rank_sampled(cfg, scorer, prompts, samples, rng, "sampled")
    trained = [r for r in records if not held_out(r.prompt)]
    edits = fact_edits(cfg, world, scorer, trained)
    tones = tone_edits(cfg, scorer, trained)
    logger.info(
        "demo comparisons: %d templated rankings, %d sampled ones (K=%d), %d fact edits, %d tone edits",
        len(templated),
        len(samples),
        cfg.reward.collect.responses_per_prompt,
        len(edits),
        len(tones),
    )
    return records + edits + tones


def fact_edits(cfg: PipelineConfig, world: World, scorer: GoldScorer, records: list[Ranking]) -> list[Ranking]:
    """Minimal pairs that differ only in the stated fact: for each ranking of a fact question, up to
    `reward.collect.fact_edits` of its responses that state exactly one of the world's values are copied with that
    value changed (the right one to a wrong one of the same relation, any other to the right one), and each pair
    (response, copy) is ranked by an annotator, with noise and ties as in every ranking (source "edited").

    A reward model built from a small policy reads politeness sooner than facts: without such pairs it prefers a
    polite wrong answer to a rude right one (see benchmarks/results/demo_reward.md). Edited responses are the
    counterfactual augmentation of robust reward-model training (Liu et al. 2024, "RRM"); they stay out of the
    held-out splits."""
    per_prompt = cfg.reward.collect.fact_edits
    if per_prompt == 0:
        return []
    rng = random.Random(f"fact-edits-{cfg.seed}")  # its own stream: the other rankings are the same with or without
    noise, tie_margin = cfg.world.annotator_noise, cfg.world.annotator_tie_margin
    every_value = sorted({v for relation in RELATIONS for v in world.values(relation)}, key=len, reverse=True)
    edits = []
    for record in records:
        question = record.prompt[-1]["content"] if isinstance(record.prompt, list) else record.prompt
        kind, entity, relation = scorer.parse_prompt(question)
        if kind != "fact":
            continue
        right = world.facts[entity][relation]
        stating = []
        for response in record.responses:
            stated = [v for v in every_value if word_pattern(v).search(response)]
            if len(stated) == 1:
                stating.append((response, stated[0]))
        for response, value in rng.sample(stating, min(per_prompt, len(stating))):
            new = rng.choice([v for v in world.values(relation) if v != right]) if value == right else right
            edited = word_pattern(value).sub(new, response)
            pair = [response, edited] if rng.random() < 0.5 else [edited, response]
            ranking = rank_responses(scorer, question, pair, rng, noise, tie_margin)
            gold = rank_responses(scorer, question, pair, rng, 0.0, tie_margin)
            edits.append(Ranking(record.prompt, pair, ranking, source="edited", gold_ranking=gold))
    return edits


def tone_edits(cfg: PipelineConfig, scorer: GoldScorer, records: list[Ranking]) -> list[Ranking]:
    """Minimal pairs that differ only in tone: for each ranking, up to `reward.collect.tone_edits` of its responses
    are copied with one change of tone, drawn from those that apply: its polite sentences dropped (or, with none, a
    polite opening or closing added), or its rude sentences dropped (or, with none, the response wrapped in a rude
    answer). Each pair (response, copy) is ranked by an annotator, with noise and ties as in every ranking (source
    "edited"), like `fact_edits`.

    A reward model built from a small policy picks out one polite or rude phrase in noisy sampled text less surely
    than a word list does (benchmarks/results/demo_reward.md); pairs where only that phrase changes isolate it."""
    per_prompt = cfg.reward.collect.tone_edits
    if per_prompt == 0:
        return []
    rng = random.Random(f"tone-edits-{cfg.seed}")  # its own stream, as fact_edits'
    noise, tie_margin = cfg.world.annotator_noise, cfg.world.annotator_tie_margin
    edits = []
    for record in records:
        question = record.prompt[-1]["content"] if isinstance(record.prompt, list) else record.prompt
        for response in rng.sample(record.responses, min(per_prompt, len(record.responses))):
            edited = retone(scorer, question, response, rng)
            if edited is None:
                continue
            pair = [response, edited] if rng.random() < 0.5 else [edited, response]
            ranking = rank_responses(scorer, question, pair, rng, noise, tie_margin)
            gold = rank_responses(scorer, question, pair, rng, 0.0, tie_margin)
            edits.append(Ranking(record.prompt, pair, ranking, source="edited", gold_ranking=gold))
    return edits


def retone(scorer: GoldScorer, question: str, response: str, rng: random.Random) -> str | None:
    """`response` with one change of tone (see `tone_edits`), or None where the change leaves nothing or changes
    nothing the gold rule reads."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", response.strip()) if s]
    polite = [s for s in sentences if any(m in s.lower() for m in POLITE_MARKERS)]
    rude = [s for s in sentences if scorer.judge(question, s).rude]
    if rng.random() < 0.5:  # politeness
        if polite:
            sentences = [s for s in sentences if s not in polite]
        elif rng.random() < 0.5:
            sentences = [rng.choice(POLITE_OPENINGS[:-1]).strip(), *sentences]
        else:
            sentences = [*sentences, rng.choice(POLITE_CLOSINGS[:-1]).strip()]
    elif rude:
        sentences = [s for s in sentences if s not in rude]
    else:
        sentences = [rng.choice(RUDE_ANSWERS).format(s=" ".join(sentences))]
    edited = " ".join(sentences).strip()
    if not edited or scorer.judge(question, edited).score == scorer.judge(question, response).score:
        return None
    return edited


def rank_sampled(
    cfg: PipelineConfig,
    scorer: GoldScorer,
    prompts: list[list[dict[str, str]]],
    samples: list[list[str]],
    rng: random.Random,
    source: str,
) -> list[Ranking]:
    """Each prompt's sampled responses ranked by one annotator (noise and ties of `world:`), with the noise-free
    gold ranking that evaluation compares against."""
    noise, tie_margin = cfg.world.annotator_noise, cfg.world.annotator_tie_margin
    records = []
    for prompt, responses in zip(prompts, samples, strict=True):
        question = prompt[-1]["content"]
        ranking = rank_responses(scorer, question, responses, rng, noise, tie_margin)
        gold = rank_responses(scorer, question, responses, rng, 0.0, tie_margin)
        records.append(Ranking(prompt, responses, ranking, source=source, gold_ranking=gold))
    return records
