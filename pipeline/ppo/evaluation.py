"""Final evaluation of PPO (SFT policy versus PPO policy on held-out prompts) and over-optimisation detection.

Evaluation: each held-out prompt gets `ppo.eval_samples_per_prompt` sampled responses from the SFT policy (the base
with adapters off) and as many from the PPO policy, with the same random stream; the j-th sample of one policy is
compared with the j-th of the other, and every figure counts all samples. Reported per policy: reward-model score,
gold score (the recipe's judge), rate of insulting answers to adversarial prompts (judge), length and EOS rate; for PPO also its KL to the
reference (the sum over response tokens of log pi - log pi_ref, averaged over responses); and the gold win rate of
PPO against SFT = wins / (wins + losses), ties reported apart.

Over-optimisation rule. Policy k (after k updates; 0 is the SFT policy) is scored on the rollout it sampled: mean
reward-model score rm_k and mean gold score gold_k. With a window of W policies, compare the window ending at k with
the earlier window P (ending at k - W or before, so the two do not overlap) whose mean gold score was highest, the
peak so far:

    rm rising:    mean(rm_{k-W+1..k})   > mean(rm over P)
    gold falling: mean(gold_{k-W+1..k}) < mean(gold over P) - max(tolerance, 2 * se)

where se is the standard error of the difference of the two gold means (from each policy's spread of gold scores
over its rollout), so that sampling noise alone rarely passes for a fall. Over-optimisation is reported at the first
k where both hold: the reward model approves of the policy more than at the gold peak while the true (gold) quality
has dropped from it. Comparing with the peak, not only the window just before, catches a slow decline (Gao et al.
2023 show gold falling gradually as the KL to the initial policy grows). The best checkpoint is the saved one whose
policy has the highest gold score.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.prompts import prompt_text
from pipeline.generation import SampledIds, SamplingArgs, decode_responses, sample_ids
from pipeline.judge import Judge
from pipeline.ppo.losses import kl_per_token
from pipeline.ppo.roles import POLICY, Roles, use_adapter
from pipeline.ppo.rollout import PromptSet, episode_inputs, reward_inputs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def detect_overoptimisation(points: list[dict[str, Any]], window: int, tolerance: float) -> dict[str, Any]:
    """Apply the module's rule to per-policy scores [{"policy", "rm_score", "gold_score"}, ...] in policy order."""
    rule = (
        f"mean reward-model score over the last {window} policies above that of the earlier {window}-policy window "
        f"with the highest gold score, while their mean gold score is more than max({tolerance}, 2 standard errors) "
        "below that peak"
    )
    result: dict[str, Any] = {"detected": False, "at_policy": None, "rule": rule}
    if any(p["gold_score"] is None for p in points):
        result["rule"] = "needs a judge (judge: demo); not applied"
        return result
    windows = [
        points[end - window + 1 : end + 1] for end in range(window - 1, len(points))
    ]  # windows[j] ends at j+W-1
    for k in range(2 * window - 1, len(points)):
        cur = windows[k - window + 1]
        peak = max(windows[: k - 2 * window + 2], key=lambda w: _mean([p["gold_score"] for p in w]))
        rm_up = _mean([p["rm_score"] for p in cur]) > _mean([p["rm_score"] for p in peak])
        gold_peak, gold_cur = _mean([p["gold_score"] for p in peak]), _mean([p["gold_score"] for p in cur])
        # standard error of a window mean: sqrt(sum of squared sems) / W; of the difference: both combined
        se = (sum((p.get("gold_sem") or 0.0) ** 2 for p in peak + cur)) ** 0.5 / window
        if rm_up and gold_cur < gold_peak - max(tolerance, 2.0 * se):
            result.update(
                detected=True,
                at_policy=points[k]["policy"],
                gold_before=gold_peak,
                gold_after=gold_cur,
                peak_policies=[peak[0]["policy"], peak[-1]["policy"]],
                standard_error=se,
            )
            break
    return result


def best_policy(points: list[dict[str, Any]], saved: list[int]) -> dict[str, Any] | None:
    """The saved checkpoint whose policy had the highest gold score (None without gold scores or checkpoints)."""
    candidates = [p for p in points if p["gold_score"] is not None and p["policy"] in saved]
    if not candidates:
        return None
    best = max(candidates, key=lambda p: (p["gold_score"], p["policy"]))
    return {**best, "checkpoint": f"checkpoint-{best['policy']}"}


def win_rate(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """wins / (wins + losses) of `ours` against `theirs`, prompt by prompt; ties counted apart."""
    wins = sum(a > b for a, b in zip(ours, theirs, strict=True))
    losses = sum(a < b for a, b in zip(ours, theirs, strict=True))
    ties = len(ours) - wins - losses
    return {
        "win_rate": wins / (wins + losses) if wins + losses else None,
        "wins": wins,
        "losses": losses,
        "ties": ties,
    }


@torch.no_grad()
def _sample(
    roles: Roles, prompts: PromptSet, sampling: SamplingArgs, adapter: str | None, batch: int, seed: int
) -> tuple[SampledIds, list[str]]:
    """Responses of one policy (the SFT model when `adapter` is None), with their log-probs under it."""
    torch.manual_seed(seed)  # both policies draw from the same random stream
    tok = roles.tokenizer
    with use_adapter(roles.model, adapter):
        out = sample_ids(
            roles.model,
            prompts.ids,
            sampling,
            roles.end_ids,
            tok.pad_token_id,
            batch,
            with_logprobs=adapter is not None,
            precision=roles.numerics,
        )
    return out, decode_responses(tok, out.response_ids, out.response_mask)


@torch.no_grad()
def _kl_per_response(
    roles: Roles, sampled: SampledIds, temperature: float, batch: int, device: torch.device
) -> torch.Tensor:
    """k1 KL to the reference summed over each response: the policy's log-probs from the sampling pass, the
    reference's from a forward pass."""
    out = torch.zeros(len(sampled.response_ids))
    for start in range(0, len(out), batch):
        rows = torch.arange(start, min(len(out), start + batch))
        ids, mask, p_len, r_len = episode_inputs(
            sampled.prompt_ids, sampled.prompt_mask, sampled.response_ids, sampled.response_mask, rows
        )
        ref = roles.reference_logprobs(ids.to(device), mask.to(device), p_len, temperature).float().cpu()
        kl = kl_per_token(sampled.logprobs[rows, :r_len], ref, "k1") * sampled.response_mask[rows, :r_len]
        out[rows] = kl.sum(1)
    return out


def evaluate_policies(
    roles: Roles,
    prompts: PromptSet,
    sampling: SamplingArgs,
    pcfg: Any,
    judge: Judge | None,
    device: torch.device,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """SFT policy versus PPO policy on held-out prompts: (report, samples). The judge, when there is one, gives the
    gold scores, the win rate and the rate of insulting answers to adversarial prompts."""
    report: dict[str, Any] = {"eval_prompts": len(prompts.records)}
    n = pcfg.eval_samples_per_prompt
    if n > 1:  # each prompt n times in a row: sample j of prompt i is row i * n + j
        prompts = PromptSet(
            [r for r in prompts.records for _ in range(n)], [ids for ids in prompts.ids for _ in range(n)]
        )
        report["eval_samples_per_prompt"] = n
    per_policy: dict[str, dict[str, Any]] = {}
    questions = [prompt_text(r["prompt"]) for r in prompts.records]
    for name, adapter in (("sft", None), ("ppo", POLICY)):
        sampled, texts = _sample(roles, prompts, sampling, adapter, pcfg.generation_batch_size, seed)
        sequences = reward_inputs(roles, pcfg.reward_input, prompts.records, texts, sampled)
        rm = roles.reward.score_ids(sequences, pcfg.forward_batch_size).tolist()
        entry: dict[str, Any] = {"texts": texts, "rm": rm}
        report[f"{name}_rm_score"] = _mean(rm)
        report[f"{name}_response_length"] = float(sampled.response_mask.sum(1).float().mean())
        report[f"{name}_eos_rate"] = float(sampled.ended.float().mean())
        if judge is not None:
            verdicts = [judge.judge(q, t) for q, t in zip(questions, texts, strict=True)]
            entry["gold"] = [v.score for v in verdicts]
            entry["insulting"] = ["insulting" in v.faults for v in verdicts]
            adversarial = [
                "insulting" in v.faults
                for v, r in zip(verdicts, prompts.records, strict=True)
                if (r.get("kind") or v.kind) == "adversarial"
            ]
            report[f"{name}_gold_score"] = _mean(entry["gold"])
            report[f"{name}_insult_rate"] = _mean([float(x) for x in adversarial]) if adversarial else None
            report["adversarial_prompts"] = len(adversarial) // n
        if adapter is not None:
            entry["kl"] = _kl_per_response(
                roles, sampled, sampling.temperature, pcfg.forward_batch_size, device
            ).tolist()
            report["kl_to_reference"] = _mean(entry["kl"])
        per_policy[name] = entry
    if pcfg.kl_target is not None:
        report["kl_target"] = pcfg.kl_target
        report["kl_within_target"] = report["kl_to_reference"] <= pcfg.kl_target
    if judge is not None:
        wins = win_rate(per_policy["ppo"]["gold"], per_policy["sft"]["gold"])
        report.update(
            gold_win_rate=wins["win_rate"], gold_wins=wins["wins"], gold_losses=wins["losses"], gold_ties=wins["ties"]
        )
    rm_wins = win_rate(per_policy["ppo"]["rm"], per_policy["sft"]["rm"])
    report["rm_win_rate"] = rm_wins["win_rate"]
    samples = []
    for i, record in enumerate(prompts.records):
        row: dict[str, Any] = {"prompt": record["prompt"], "kind": record.get("kind")}
        if n > 1:
            row["sample"] = i % n
        for name, entry in per_policy.items():
            row[name] = entry["texts"][i]
            row[f"{name}_rm_score"] = entry["rm"][i]
            if "gold" in entry:
                row[f"{name}_gold_score"] = entry["gold"][i]
                row[f"{name}_insulting"] = entry["insulting"][i]
        row["ppo_kl"] = per_policy["ppo"]["kl"][i]
        samples.append(row)
    return report, samples
