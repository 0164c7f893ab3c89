"""Held-out evaluation of a reward model: pairwise accuracy against the (gold) rankings, a three-class judgement
(better / worse / tie, with the tie tolerance chosen on the validation split), Kendall's tau, the reward
distribution, the accuracy of length-only and keyword-only scorers on the same pairs, and the mean and std of rewards
on the SFT policy's responses (`reward_stats.json`, PPO's reward normalisation)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline import demo
from pipeline.config import PipelineConfig, RewardConfig
from pipeline.data.comparisons import load_policy, sample_responses, sampling_args
from pipeline.data.rankings import Ranking, strict_pairs, tied_pairs, tier_of
from pipeline.metrics import load_metric
from pipeline.modeling import encode_reward_inputs, reward_scores, score_sequences

logger = logging.getLogger(__name__)


def choose_tie_tolerance(differences: torch.Tensor, labels: list[str], candidates: int = 200) -> float:
    """The |reward difference| at or below which a pair is called a tie, maximising macro F1 on these pairs.

    `differences` are r_first - r_second of ordered pairs, `labels` their human judgements ("better", "worse",
    "tie"). Candidates are 0 and quantiles of |difference|; the smallest of equally good tolerances wins.
    """
    if not labels:
        return 0.0
    magnitude = differences.abs().double()
    grid = torch.quantile(magnitude, torch.linspace(0, 1, candidates, dtype=torch.double)).unique()
    options = torch.cat([torch.zeros(1, dtype=torch.double), grid])
    truth = torch.tensor([("better", "worse", "tie").index(label) for label in labels])
    best, best_f1 = 0.0, -1.0
    for tolerance in options.tolist():
        predicted = torch.where(magnitude <= tolerance, 2, torch.where(differences > 0, 0, 1))
        f1s = []
        for c in range(3):
            tp = ((predicted == c) & (truth == c)).sum().item()
            n_pred, n_true = (predicted == c).sum().item(), (truth == c).sum().item()
            if n_pred or n_true:
                f1s.append(2 * tp / (n_pred + n_true))
        f1 = sum(f1s) / len(f1s)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = tolerance, f1
    return best


# Heuristic scorers that a reward model has to beat for its accuracy to mean something.
POLITE_WORDS = ("please", "thank", "happy to help", "of course", "glad", "sure")
RUDE_WORDS = ("stupid", "idiot", "ugh", "yourself", "dumb", "loser", "shut up", "whatever")


def length_score(response: str) -> float:
    """Baseline: longer is better (words)."""
    return float(len(response.split()))


def keyword_score(response: str, polite: tuple[str, ...] = POLITE_WORDS, rude: tuple[str, ...] = RUDE_WORDS) -> float:
    """Baseline: polite phrases count +1, rude phrases and insults -1 each."""
    text = response.lower()
    return float(sum(text.count(w) for w in polite) - sum(text.count(w) for w in rude))


def score_rankings(model: Any, tokenizer: Any, records: list[Ranking], rcfg: RewardConfig) -> list[list[float]]:
    """The reward of every response of every record."""
    sequences = [
        ids for r in records for ids in encode_reward_inputs(tokenizer, r.prompt, r.responses, rcfg.max_seq_len)
    ]
    flat = score_sequences(model, sequences, tokenizer.pad_token_id, rcfg.per_device_eval_batch_size).tolist()
    out, start = [], 0
    for r in records:
        out.append(flat[start : start + len(r.responses)])
        start += len(r.responses)
    return out


def ordered_pairs(records: list[Ranking], rewards: list[list[float]]) -> tuple[torch.Tensor, list[str]]:
    """Every pair of every record in both orders: (r_first - r_second, "better" | "worse" | "tie")."""
    differences, labels = [], []
    for record, r in zip(records, rewards, strict=True):
        tiers = record.gold_tiers
        for i, j in strict_pairs(tiers):
            differences += [r[i] - r[j], r[j] - r[i]]
            labels += ["better", "worse"]
        for i, j in tied_pairs(tiers):
            differences += [r[i] - r[j], r[j] - r[i]]
            labels += ["tie", "tie"]
    return torch.tensor(differences, dtype=torch.double), labels


def pairwise_accuracy(records: list[Ranking], scores: list[list[float]], metric: Any) -> dict[str, Any]:
    chosen, rejected = [], []
    for record, s in zip(records, scores, strict=True):
        for i, j in strict_pairs(record.gold_tiers):
            chosen.append(s[i])
            rejected.append(s[j])
    return metric.compute(chosen_rewards=chosen, rejected_rewards=rejected)


def evaluate_split(records: list[Ranking], rewards: list[list[float]], tolerance: float, metrics: dict) -> dict:
    """Pairwise accuracy, three-class judgement (precision/recall/F1), Kendall's tau-b and the reward distribution."""
    out = pairwise_accuracy(records, rewards, metrics["pairwise_accuracy"])
    differences, labels = ordered_pairs(records, rewards)
    judged = metrics["pair_judgement"].compute(
        reward_differences=differences.tolist(), references=labels, tolerance=tolerance
    )
    out.update({f"judgement_{k}": v for k, v in judged.items() if k not in ("tolerance",)})
    human = [[-float(t) for t in tier_of(r.gold_tiers)] for r in records]
    tau = metrics["kendall_tau"].compute(predictions=rewards, references=human)
    out.update(kendall_tau=tau["kendall_tau"], kendall_prompts=tau["prompts"])
    distribution = metrics["reward_distribution"].compute(rewards=[x for r in rewards for x in r])
    out.update({f"reward_{k}": v for k, v in distribution.items()})
    out["prompts"] = len(records)
    return out


def baseline_accuracies(records: list[Ranking], metric: Any, keywords: tuple | None = None) -> dict[str, float]:
    """Pairwise accuracy of the length-only and keyword-only scorers on the same pairs."""
    polite, rude = keywords or (POLITE_WORDS, RUDE_WORDS)
    out = {}
    for name, fn in (("length", length_score), ("keyword", lambda x: keyword_score(x, polite, rude))):
        scores = [[fn(x) for x in r.responses] for r in records]
        out[name] = pairwise_accuracy(records, scores, metric)["accuracy"]
    return out


def evaluate_reward_model(cfg: PipelineConfig, model: Any, tokenizer: Any, splits: dict[str, list]) -> dict:
    """Metrics on the test split (overall and per source, e.g. templated vs sampled) with the tie tolerance chosen
    on the validation split, and the baselines' accuracy on the same pairs."""
    rcfg, test = cfg.reward, splits["test"]
    if not test:
        logger.warning("no test prompts (reward.test_share is 0): no held-out metrics")
        return {}
    metrics = {
        name: load_metric(name)
        for name in ("pairwise_accuracy", "pair_judgement", "kendall_tau", "reward_distribution")
    }
    tolerance = 0.0  # without validation prompts a pair is a tie only when both rewards are equal
    if splits["validation"]:
        val_rewards = score_rankings(model, tokenizer, splits["validation"], rcfg)
        tolerance = choose_tie_tolerance(*ordered_pairs(splits["validation"], val_rewards))
    result: dict[str, Any] = {"tie_tolerance": tolerance}
    keywords = demo.keywords() if rcfg.dataset == demo.DEMO else None
    rewards = score_rankings(model, tokenizer, test, rcfg)
    groups = {"all": list(range(len(test)))}
    for source in sorted({r.source for r in test if r.source}):
        groups[source] = [i for i, r in enumerate(test) if r.source == source]
    for group, index in groups.items():
        records = [test[i] for i in index]
        result[group] = evaluate_split(records, [rewards[i] for i in index], tolerance, metrics)
        result[group]["baselines"] = baseline_accuracies(records, metrics["pairwise_accuracy"], keywords)
        result[group]["rewards_by_place"] = rewards_by_place(records, [rewards[i] for i in index])
    return result


def rewards_by_place(records: list[Ranking], rewards: list[list[float]]) -> dict[str, list[float]]:
    """Held-out rewards grouped by the response's place in its evaluation ranking: best tier, worst tier, between
    (the report's reward histograms)."""
    out: dict[str, list[float]] = {"best": [], "between": [], "worst": []}
    for record, scores in zip(records, rewards, strict=True):
        tiers = tier_of(record.gold_tiers)
        last = max(tiers)
        for tier, score in zip(tiers, scores, strict=True):
            place = "best" if tier == 0 else "worst" if tier == last else "between"
            out[place].append(round(float(score), 4))
    return out


def policy_reward_stats(cfg: PipelineConfig, model: Any, tokenizer: Any, splits: dict[str, list], base: str) -> dict:
    """Mean and std of rewards on the SFT policy's responses (PPO normalises rewards with them)."""
    rcfg = cfg.reward
    sampled = [r for rows in splits.values() for r in rows if r.source == "sampled"]
    if sampled:
        prompts = [r.prompt for r in sampled for _ in r.responses]
        responses = [x for r in sampled for x in r.responses]
        source = "sampled SFT responses of the collected comparisons"
    elif rcfg.stats_prompts > 0:
        policy, policy_tokenizer = load_policy(base)
        prompts = [r.prompt for r in splits["train"][: rcfg.stats_prompts]]
        torch.manual_seed(cfg.seed)
        responses = [
            s[0]
            for s in sample_responses(
                policy, policy_tokenizer, prompts, 1, sampling_args(cfg), rcfg.per_device_eval_batch_size
            )
        ]
        del policy
        source = f"SFT responses sampled for {len(prompts)} training prompts"
    else:
        prompts = [r.prompt for r in splits["train"] for _ in r.responses]
        responses = [x for r in splits["train"] for x in r.responses]
        source = "responses of the training rankings"
    rewards = reward_scores(model, tokenizer, prompts, responses, rcfg.max_seq_len, rcfg.per_device_eval_batch_size)
    return {
        "mean": rewards.mean().item(),
        "std": rewards.std(unbiased=False).item(),
        "count": len(responses),
        "source": source,
    }
