"""reward_distribution: summary of a set of rewards (mean, std, extremes, quantiles).

A local `evaluate` metric module (a measurement of one list), loaded offline by path:

    import evaluate
    metric = evaluate.load("pipeline/metrics/reward_distribution")
    metric.compute(rewards=[0.5, -1.0, 2.0])

The standard deviation is the population one (divided by n), the one PPO's reward normalisation divides by.
Quantiles interpolate linearly between order statistics.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Mean, standard deviation, min, max and the 5/25/50/75/95 % quantiles of rewards."

_KWARGS_DESCRIPTION = """
Args:
    rewards (list of float): rewards of responses.
Returns:
    count, mean, std, min, max, p05, p25, p50, p75, p95 (floats; all 0.0 when there are no rewards).
"""


def quantile(ordered, q):
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RewardDistribution(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"rewards": datasets.Value("float64")}),
        )

    def _compute(self, rewards):
        n = len(rewards)
        if not n:
            return {k: 0.0 for k in ("count", "mean", "std", "min", "max", "p05", "p25", "p50", "p75", "p95")}
        mean = sum(rewards) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
        ordered = sorted(rewards)
        out = {"count": n, "mean": mean, "std": std, "min": ordered[0], "max": ordered[-1]}
        for q in (5, 25, 50, 75, 95):
            out[f"p{q:02d}"] = quantile(ordered, q / 100)
        return out
