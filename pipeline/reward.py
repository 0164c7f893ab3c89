"""Stage 3: a reward model from K-wise rankings with ties (C > B > A = D).

Reads the SFT stage's merged model (`sft/final/merged`, the base PPO uses too) and rankings: collected in the demo
(SFT samples and templated responses ranked by simulated annotators), or read from a file, directory or Hub dataset
in any of the formats of `pipeline/data/rankings.py` (rankings, pairs, scored completions, message trees, filled-in
ranking tasks). Trains a scalar head with LoRA (or QLoRA, or in full) using the transformers Trainer with our K-wise
loss as its one overridden hook: each prompt's K responses are scored in one forward pass and the Bradley-Terry loss
is averaged over that prompt's strictly ordered pairs (InstructGPT, Ouyang et al. 2022, eq. 1), so one prompt is one
batch element. Writes `reward/final/`: the adapter with the score head, the tokenizer, `reward_stats.json` (mean and
std of rewards on the SFT policy's responses, for PPO's reward normalisation), `eval.json` and `stage.json`.

    rlhf reward recipes/demo.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from pipeline.checkpoints import (
    final_dir,
    finishing,
    newest_checkpoint,
    prepare_stage,
    raise_if_preempted,
    stage_dir,
    stage_identity,
    train_from,
    trainer_checkpoint_callback,
    write_json_atomic,
    write_stage_json,
)
from pipeline.config import PipelineConfig, RewardConfig
from pipeline.data.rankings import (
    Ranking,
    prompt_key,
    read_rankings,
    strict_pairs,
    tied_pairs,
    tier_of,
    write_rankings,
)
from pipeline.errors import UserError
from pipeline.tracking import count_parameters, distributed_state, on_main

logger = logging.getLogger(__name__)

STAGE = "reward"
SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------------------------
# Maths: pure functions of rewards (B prompts x K responses) and tiers (B x K, 0 = best, -1 = padding)


def pair_masks(tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, tied), both (B, K, K): better[b, i, j] when response i ranks strictly above j; tied[b, i, j] when
    i and j share a tier and i < j (each tied pair once). Padding (tier -1) is in no pair."""
    valid = tiers >= 0
    both = valid[:, :, None] & valid[:, None, :]
    upper, lower = tiers[:, :, None], tiers[:, None, :]
    k = tiers.shape[1]
    above_diagonal = torch.ones(k, k, dtype=torch.bool, device=tiers.device).triu(1)
    return both & (upper < lower), both & (upper == lower) & above_diagonal


def tie_parameter(tie_model: str, tie_probability: float) -> float:
    """The tie parameter that gives two equally rewarded responses a tie with probability `tie_probability`.

    Rao-Kupper (1967): P(tie | equal) = (theta - 1) / (theta + 1); we return nu = log theta.
    Davidson (1970): P(tie | equal) = nu / (2 + nu); we return nu.
    """
    p = tie_probability
    if tie_model == "rao_kupper":
        return math.log((1 + p) / (1 - p))
    if tie_model == "davidson":
        return 2 * p / (1 - p)
    raise ValueError(f"tie_model {tie_model!r} has no tie parameter")


def win_nll(x: torch.Tensor, tie_model: str = "none", nu: float = 0.0) -> torch.Tensor:
    """-log P(i beats j) for reward differences x = r_i - r_j (minus any margin).

    Bradley-Terry: P = sigmoid(x). Rao-Kupper: P = sigmoid(x - nu). Davidson: P = e^(x/2) / (e^(x/2) + e^(-x/2) + nu).
    """
    if tie_model == "none":
        return -F.logsigmoid(x)
    if tie_model == "rao_kupper":
        return -F.logsigmoid(x - nu)
    if tie_model == "davidson":
        return -(x / 2 - _davidson_denominator(x, nu))
    raise ValueError(f"unknown tie_model {tie_model!r}")


def tie_nll(x: torch.Tensor, tie_model: str, nu: float) -> torch.Tensor:
    """-log P(i ties j) for reward differences x = r_i - r_j.

    Rao-Kupper: P = (theta^2 - 1) sigmoid(x - nu) sigmoid(-x - nu) with theta = e^nu.
    Davidson: P = nu / (e^(x/2) + e^(-x/2) + nu).
    """
    if tie_model == "rao_kupper":
        return -(math.log(math.expm1(2 * nu)) + F.logsigmoid(x - nu) + F.logsigmoid(-x - nu))
    if tie_model == "davidson":
        return -(math.log(nu) - _davidson_denominator(x, nu))
    raise ValueError(f"tie_model {tie_model!r} has no tie likelihood")


def _davidson_denominator(x: torch.Tensor, nu: float) -> torch.Tensor:
    return torch.logsumexp(torch.stack([x / 2, -x / 2, torch.full_like(x, math.log(nu))]), dim=0)


def ranking_loss(
    rewards: torch.Tensor,
    tiers: torch.Tensor,
    margin: torch.Tensor | None = None,
    tie_model: str = "none",
    tie_probability: float = 1 / 3,
) -> torch.Tensor:
    """The K-wise ranking loss: per prompt, the mean negative log-likelihood of its pairs; then the mean over prompts.

    Strict pairs (i above j) contribute -log P(i beats j) at the difference r_i - r_j - margin. Tied pairs add
    nothing with tie_model="none" (Bradley-Terry, InstructGPT's loss); with "rao_kupper" or "davidson" they add
    -log P(tie) and the strict pairs use that model's win probability. Prompts without a counted pair are left out.

    Args:
        rewards: (B, K) scores (padding entries are ignored).
        tiers: (B, K) tier of each response, 0 = best, -1 = padding.
        margin: (B,) margin for each prompt's strict pairs, or None.
    """
    better, tied = pair_masks(tiers)
    diff = rewards[:, :, None] - rewards[:, None, :]
    x = diff - margin[:, None, None] if margin is not None else diff
    nu = tie_parameter(tie_model, tie_probability) if tie_model != "none" else 0.0
    nll = torch.where(better, win_nll(x, tie_model, nu), torch.zeros_like(x))
    counted = better
    if tie_model != "none":
        nll = nll + torch.where(tied, tie_nll(diff, tie_model, nu), torch.zeros_like(x))
        counted = better | tied
    pairs = counted.sum(dim=(1, 2))
    if not bool((pairs > 0).any()):
        return rewards.sum() * 0.0  # keeps the graph (DDP expects every parameter to get a gradient)
    per_prompt = nll.sum(dim=(1, 2)) / pairs.clamp(min=1)
    return per_prompt[pairs > 0].mean()


def centering_penalty(rewards: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """mean(r^2) over real responses: pulls rewards towards 0 (Eisenstein et al. 2023, "Helping or herding?")."""
    valid = tiers >= 0
    return (rewards[valid] ** 2).mean()


def scatter_rewards(flat: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """Rewards of the flattened sequences (prompt by prompt) laid out as (B, K); padding slots are 0."""
    return torch.zeros(tiers.shape, dtype=flat.dtype, device=flat.device).masked_scatter(tiers >= 0, flat)


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


# --------------------------------------------------------------------------------------------------------------
# Data: rankings -> token ids -> batches of whole prompts


@dataclass
class RankingCollator:
    """Batches prompts with all their responses: K_1 + ... + K_B right-padded sequences, tiers and margins.

    Returns input_ids and attention_mask (sum K_b, L), tiers (B, max K_b) with -1 for padding, margin (B,).
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from pipeline.modeling import right_pad

        input_ids, attention_mask = right_pad([ids for f in features for ids in f["input_ids"]], self.pad_token_id)
        k = max(len(f["tiers"]) for f in features)
        tiers = torch.full((len(features), k), -1, dtype=torch.long)
        for b, f in enumerate(features):
            tiers[b, : len(f["tiers"])] = torch.as_tensor(f["tiers"], dtype=torch.long)
        margin = torch.tensor([float(f.get("margin", 0.0)) for f in features])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "tiers": tiers, "margin": margin}


def encode_rankings(records: list[Ranking], tokenizer: Any, rcfg: RewardConfig) -> list[dict[str, Any]]:
    """One training example per prompt: the token ids of its K responses, their tiers and the pair margin."""
    from pipeline.modeling import encode_reward_inputs

    rows = []
    for r in records:
        ids = encode_reward_inputs(tokenizer, r.prompt, r.responses, rcfg.max_seq_len)
        row = {"input_ids": ids, "tiers": tier_of(r.tiers), "margin": rcfg.margin + r.margin}
        rows.append({**row, "length": max(len(x) for x in ids)})  # batches of similar lengths pad less
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


def prepare_comparisons(cfg: PipelineConfig, base: str) -> dict[str, Any]:
    """Collect or read the rankings and write `reward/comparisons/{train,validation,test}.jsonl` (once: a resumed
    run reuses them). Returns what was read and skipped."""
    rcfg, out = cfg.reward, stage_dir(cfg, STAGE) / "comparisons"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    summary: dict[str, Any] = {}
    split_of = None
    if rcfg.dataset == "demo":  # split the world's prompts first: the SFT model answers every held-out one
        from pipeline.data.comparisons import collect_demo_rankings, demo_prompts

        keys = {prompt_key(p) for p in demo_prompts(cfg)}
        split_of = assign_splits(keys, rcfg.validation_share, rcfg.test_share, cfg.seed)
        records = collect_demo_rankings(cfg, base, held_out=lambda p: prompt_key(p) in split_of)
    else:
        records, skipped = read_rankings(rcfg.dataset, rcfg.dataset_format, rcfg.on_bad_record, rcfg.dataset_split,
                                         rcfg.dataset_config, rcfg.score_key)  # fmt: skip
        summary["skipped"] = {"total": skipped.total, "kept": skipped.kept, "reasons": dict(skipped.reasons),
                              "first": skipped.first}  # fmt: skip
    if rcfg.max_records > 0 and len(records) > rcfg.max_records:
        records = random.Random(cfg.seed).sample(records, rcfg.max_records)
    splits = split_by_prompt(records, rcfg.validation_share, rcfg.test_share, cfg.seed, split_of)
    for name, rows in splits.items():
        write_rankings(rows, out / f"{name}.jsonl")
    summary["records"] = {name: len(rows) for name, rows in splits.items()}
    summary["pairs"] = {name: sum(len(strict_pairs(r.tiers)) for r in rows) for name, rows in splits.items()}
    summary["tied_pairs"] = {name: sum(len(tied_pairs(r.tiers)) for r in rows) for name, rows in splits.items()}
    write_json_atomic(out / "summary.json", summary)
    return summary


def export_tasks(cfg: PipelineConfig, base: str) -> None:
    """reward.dataset=collect: sample responses and write `run_dir/ranking_tasks.csv` for people; always raises
    a UserError that says what to do next (the stage cannot train before the rankings come back)."""
    from pipeline.data.comparisons import collect_ranking_tasks

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


def read_split(cfg: PipelineConfig, name: str) -> list[Ranking]:
    path = stage_dir(cfg, STAGE) / "comparisons" / f"{name}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return read_rankings(path, "rankings", on_bad="error")[0]


# --------------------------------------------------------------------------------------------------------------
# Training: the transformers Trainer with the K-wise loss


@dataclass(frozen=True)
class LossSettings:
    tie_model: str = "none"
    tie_probability: float = 1 / 3
    center_rewards_coefficient: float = 0.0


class RankingTrainer(transformers.Trainer):
    """transformers.Trainer whose one overridden hook, `compute_loss`, scores each prompt's K responses in one
    forward pass and applies `ranking_loss`; checkpoints, resume, DDP and logging are the Trainer's own."""

    loss_is_scaled_for_ga = False  # the loss is a mean over this micro-batch's prompts; the Trainer divides by GA
    loss_settings = LossSettings()  # set per run by `build_trainer`

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tiers, s = inputs["tiers"], self.loss_settings
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = scatter_rewards(out.logits.squeeze(-1).float(), tiers)
        loss = ranking_loss(rewards, tiers, inputs["margin"], s.tie_model, s.tie_probability)
        if s.center_rewards_coefficient:
            loss = loss + s.center_rewards_coefficient * centering_penalty(rewards, tiers)
        return (loss, {"rewards": rewards}) if return_outputs else loss


def to_training_args(cfg: PipelineConfig) -> transformers.TrainingArguments:
    """The transformers TrainingArguments of this stage (checkpoint retention is ours: see checkpoints.py)."""
    from pipeline.modeling import default_dtype

    return transformers.TrainingArguments(
        **cfg.reward.trainer_kwargs(str(stage_dir(cfg, STAGE)), cfg.seed),
        bf16=default_dtype() == torch.bfloat16,  # as in SFT: bf16 autocast on a GPU that has it
        prediction_loss_only=True,
        label_names=[],
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # our columns (K sequences per row, tiers, margin) are not forward() arguments
        train_sampling_strategy="group_by_length",  # shuffled, then sorted by length within mega-batches
        length_column_name="length",
    )


def build_trainer(cfg: PipelineConfig, model: Any, tokenizer: Any, train: list[dict], validation: list[dict]):
    from datasets import Dataset

    rcfg = cfg.reward
    trainer = RankingTrainer(
        model=model,
        args=to_training_args(cfg),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(validation) if validation and rcfg.eval_steps > 0 else None,
        data_collator=RankingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[trainer_checkpoint_callback(stage_dir(cfg, STAGE), rcfg.save_total_limit)],
    )
    trainer.loss_settings = LossSettings(rcfg.tie_model, rcfg.tie_probability, rcfg.center_rewards_coefficient)
    trainer.can_return_loss = True  # evaluation asks compute_loss for the loss although there are no labels
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Evaluation


def load_metric(name: str) -> Any:
    """A metric module shipped in pipeline/metrics/<name>/ (loaded offline, kept in memory)."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / name), keep_in_memory=True)


def score_rankings(model: Any, tokenizer: Any, records: list[Ranking], rcfg: RewardConfig) -> list[list[float]]:
    """The reward of every response of every record."""
    from pipeline.modeling import encode_reward_inputs, score_sequences

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
    judged = metrics["pair_judgement"].compute(reward_differences=differences.tolist(), references=labels,
                                               tolerance=tolerance)  # fmt: skip
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
    metrics = {name: load_metric(name) for name in ("pairwise_accuracy", "pair_judgement", "kendall_tau",
                                                    "reward_distribution")}  # fmt: skip
    tolerance = 0.0  # without validation prompts a pair is a tie only when both rewards are equal
    if splits["validation"]:
        val_rewards = score_rankings(model, tokenizer, splits["validation"], rcfg)
        tolerance = choose_tie_tolerance(*ordered_pairs(splits["validation"], val_rewards))
    result: dict[str, Any] = {"tie_tolerance": tolerance}
    keywords = _demo_keywords() if rcfg.dataset == "demo" else None
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


def _demo_keywords() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The demo world's own polite and rude phrases: the strongest keyword baseline for its gold rule."""
    from pipeline.data.world import INSULT_WORDS, POLITE_MARKERS, RUDE_MARKERS

    return tuple(POLITE_MARKERS), tuple(RUDE_MARKERS) + tuple(INSULT_WORDS)


def policy_reward_stats(cfg: PipelineConfig, model: Any, tokenizer: Any, splits: dict[str, list], base: str) -> dict:
    """Mean and std of rewards on the SFT policy's responses (PPO normalises rewards with them)."""
    rcfg = cfg.reward
    sampled = [r for rows in splits.values() for r in rows if r.source == "sampled"]
    if sampled:
        prompts = [r.prompt for r in sampled for _ in r.responses]
        responses = [x for r in sampled for x in r.responses]
        source = "sampled SFT responses of the collected comparisons"
    elif rcfg.stats_prompts > 0:
        from pipeline.data.comparisons import load_policy, sample_responses, sampling_args

        policy, policy_tokenizer = load_policy(base)
        prompts = [r.prompt for r in splits["train"][: rcfg.stats_prompts]]
        torch.manual_seed(cfg.seed)
        responses = [s[0] for s in sample_responses(policy, policy_tokenizer, prompts, 1, sampling_args(cfg),
                                                    rcfg.per_device_eval_batch_size)]  # fmt: skip
        del policy
        source = f"SFT responses sampled for {len(prompts)} training prompts"
    else:
        prompts = [r.prompt for r in splits["train"] for _ in r.responses]
        responses = [x for r in splits["train"] for x in r.responses]
        source = "responses of the training rankings"
    from pipeline.modeling import reward_scores

    rewards = reward_scores(model, tokenizer, prompts, responses, rcfg.max_seq_len, rcfg.per_device_eval_batch_size)
    return {"mean": rewards.mean().item(), "std": rewards.std(unbiased=False).item(), "count": len(responses),
            "source": source}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The stage


def resolve_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The base model, the SFT stage it comes from (for the identity) and the data this stage reads."""
    rcfg = cfg.reward
    inputs = {"base": rcfg.base} if rcfg.base else {"base": str(final_dir(cfg, "sft") / "merged"),
                                                     "sft": str(final_dir(cfg, "sft"))}  # fmt: skip
    if rcfg.dataset == "demo":
        inputs["dataset"] = str(cfg.run_path / "world")
    elif rcfg.dataset == "collect":
        inputs["prompts"] = str(rcfg.collect.prompts)
    else:
        inputs["dataset"] = rcfg.dataset
    return inputs


def run(cfg: PipelineConfig, rerun: bool = False) -> Path:
    """Train (or resume, or skip when finished with the same settings) the reward model; returns `reward/final/`."""
    from pipeline.modeling import build_scalar_model
    from pipeline.tokenizer import load_tokenizer, prepare_chat_tokenizer

    started, state = time.time(), distributed_state()
    rcfg, sdir = cfg.reward, stage_dir(cfg, STAGE)
    inputs = resolve_inputs(cfg)
    if rcfg.dataset == "collect":
        on_main(lambda: export_tasks(cfg, inputs["base"]))
    identity = stage_identity(cfg, STAGE, inputs)
    done = on_main(lambda: prepare_stage(cfg, STAGE, identity, rerun))
    if done is not None:
        logger.info("reward already finished with these settings: %s", done)
        return done
    base = inputs["base"]
    data_summary = on_main(lambda: prepare_comparisons(cfg, base))
    splits = {name: read_split(cfg, name) for name in SPLITS}
    tokenizer = load_tokenizer(base)
    prepare_chat_tokenizer(tokenizer)
    train = encode_rankings(splits["train"], tokenizer, rcfg)
    if rcfg.tie_model == "none":  # a prompt whose responses are all tied has no pair to learn from
        train = [row for row in train if len(set(row["tiers"])) > 1]
    if not train:
        raise UserError(f"no training rankings with a strict pair in {rcfg.dataset} (every response tied?)")

    transformers.set_seed(cfg.seed)
    model = build_scalar_model(base, tokenizer, rcfg.finetune, rcfg.lora, rcfg.gradient_checkpointing)
    trainable, total = count_parameters(model)
    logger.info("reward config: %s", rcfg)
    logger.info("reward model: %s parameters (%s trainable); %d training prompts, %d strict pairs", f"{total:,}",
                f"{trainable:,}", len(train), data_summary["pairs"]["train"])  # fmt: skip
    trainer = build_trainer(cfg, model, tokenizer, train, encode_rankings(splits["validation"], tokenizer, rcfg))
    checkpoint = newest_checkpoint(sdir)
    if checkpoint is not None:
        logger.info("resuming reward from %s", checkpoint)
    train_started = time.time()
    output = train_from(trainer, checkpoint)
    train_seconds = time.time() - train_started
    raise_if_preempted(sdir)
    if state.is_main_process:
        model = trainer.model
        metrics: dict[str, Any] = {
            "train_loss": float(output.training_loss),
            "train_steps": trainer.state.global_step,
            "train_seconds": round(train_seconds, 2),
            "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else 0,
            "world_size": state.num_processes,
            "trainable_params": trainable,
            "total_params": total,
            "data": data_summary,
            "test": evaluate_reward_model(cfg, model, tokenizer, splits),
        }
        stats = policy_reward_stats(cfg, model, tokenizer, splits, base)
        metrics["reward_stats"] = stats
        _log_metrics(metrics)
        with finishing(cfg, STAGE) as out:
            model.save_pretrained(out)
            (out / "README.md").unlink(missing_ok=True)  # peft's placeholder card
            tokenizer.save_pretrained(out)
            write_json_atomic(out / "reward_stats.json", {"mean": stats["mean"], "std": stats["std"]})
            write_json_atomic(out / "eval.json", metrics["test"])
            metrics["stage_seconds"] = round(time.time() - started, 2)
            contents = "model" if rcfg.finetune == "full" else "adapter"
            write_stage_json(out, identity, metrics, contents=contents, extra={"finetune": rcfg.finetune})
    state.wait_for_everyone()
    return final_dir(cfg, STAGE)


def _log_metrics(metrics: dict[str, Any]) -> None:
    test = metrics["test"]
    for group, values in test.items():
        if isinstance(values, dict):
            logger.info(
                "reward %s: pairwise accuracy %.3f on %d pairs (length %.3f, keyword %.3f), Kendall tau %.3f, "
                "3-class accuracy %.3f, macro F1 %.3f", group, values["accuracy"], values["pairs"],
                values["baselines"]["length"], values["baselines"]["keyword"], values["kendall_tau"],
                values["judgement_accuracy"], values["judgement_macro_f1"],
            )  # fmt: skip
    logger.info("reward stats on SFT responses: mean %.4f, std %.4f", metrics["reward_stats"]["mean"],
                metrics["reward_stats"]["std"])  # fmt: skip
