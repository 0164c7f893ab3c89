"""kendall_tau: per-prompt Kendall's tau-b between a reward model's scores and a human ranking with ties.

A local `evaluate` metric module, loaded offline by path:

    import evaluate
    metric = evaluate.load("pipeline/metrics/kendall_tau")
    # ranking C > B > A = D as human scores (higher is better) and the model's rewards for A, B, C, D
    metric.compute(predictions=[[0.1, 0.5, 0.9, 0.3]], references=[[0, 1, 2, 0]])

Tau-b (Kendall 1945) corrects for ties on either side:

    tau_b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)),  n0 = n (n - 1) / 2

where ties_x and ties_y count the pairs tied in the model's scores and in the human ranking. A prompt whose ranking
is all ties (or whose scores are all equal) has no defined tau and is left out of the mean.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Mean over prompts of Kendall's tau-b between rewards and a human ranking with ties."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): the model's rewards for each prompt's responses.
    references (list of list of float): the human order of the same responses as scores, higher is better
        (e.g. minus the tier: C > B > A = D for A, B, C, D is [-2, -1, 0, -2]).
Returns:
    kendall_tau (float): mean tau-b over prompts where it is defined (0.0 if none).
    prompts (int): prompts with a defined tau-b.
"""


def tau_b(x, y):
    """Kendall's tau-b of two equally long score lists; None when either side is all ties."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    n0 = n * (n - 1) // 2
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (concordant - discordant) / denominator if denominator else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KendallTau(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Kendall, M. G. (1945). The treatment of ties in ranking problems. Biometrika 33(3).",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        taus = []
        for x, y in zip(predictions, references, strict=True):
            if len(x) != len(y):
                raise ValueError(f"a prompt has {len(x)} rewards but {len(y)} ranked responses")
            tau = tau_b(x, y)
            if tau is not None:
                taus.append(tau)
        return {"kendall_tau": sum(taus) / len(taus) if taus else 0.0, "prompts": len(taus)}
