"""pairwise_accuracy: how often a reward model scores the preferred response of a pair higher.

A local `evaluate` metric module, loaded offline by path:

    import evaluate
    metric = evaluate.load("pipeline/metrics/pairwise_accuracy")
    metric.compute(chosen_rewards=[1.0, 0.2, 0.5], rejected_rewards=[0.0, 0.7, 0.5])
    # {'accuracy': 0.5, 'pairs': 3, 'mean_margin': 0.1667}

The pairs are strictly ordered ones (a ranking's ties are not pairs with a preferred side). An exact tie of the two
rewards counts as half right, the expected accuracy of breaking it at random, so that a scorer that gives equal
scores to everything (a keyword count, say) is not credited with 0 or 1 by the tie rule alone.
"""

import datasets
import evaluate

_DESCRIPTION = "Share of strictly ordered pairs whose preferred response gets the higher reward (ties count 1/2)."

_KWARGS_DESCRIPTION = """
Args:
    chosen_rewards (list of float): reward of the preferred response of each pair.
    rejected_rewards (list of float): reward of the other response.
Returns:
    accuracy (float): (right + ties / 2) / pairs (0.0 for no pairs).
    pairs (int): pairs judged.
    mean_margin (float): mean of chosen minus rejected reward.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairwiseAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"chosen_rewards": datasets.Value("float64"), "rejected_rewards": datasets.Value("float64")}
            ),
        )

    def _compute(self, chosen_rewards, rejected_rewards):
        pairs = len(chosen_rewards)
        if not pairs:
            return {"accuracy": 0.0, "pairs": 0, "mean_margin": 0.0}
        right = sum(
            1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_rewards, rejected_rewards, strict=True)
        )
        margin = sum(c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)) / pairs
        return {"accuracy": right / pairs, "pairs": pairs, "mean_margin": margin}
