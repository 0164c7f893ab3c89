"""pair_judgement: every pair judged as "better", "worse" or "tie", with a tie tolerance; per-class scores.

A local `evaluate` metric module, loaded offline by path:

    import evaluate
    metric = evaluate.load("pipeline/metrics/pair_judgement")
    metric.compute(reward_differences=[1.2, -0.1, 0.05], references=["better", "worse", "tie"], tolerance=0.1)

Each held-out pair of a ranking is judged in both orders: for A > B the pair (A, B) is "better" and (B, A) is "worse";
for A = B both orders are "tie". The reward model's judgement of an ordered pair (first, second) with reward difference
d = r_first - r_second is "tie" when |d| <= tolerance, else "better" (d > 0) or "worse". The tolerance is chosen on a
validation split (the reward stage maximises macro F1 there), never on the pairs scored here.
"""

import datasets
import evaluate

CLASSES = ("better", "worse", "tie")

_DESCRIPTION = (
    "Three-class judgement of ordered pairs (better / worse / tie): accuracy and per-class precision, recall, F1."
)

_KWARGS_DESCRIPTION = """
Args:
    reward_differences (list of float): r_first - r_second for each ordered pair.
    references (list of str): the human judgement of each ordered pair: "better", "worse" or "tie".
    tolerance (float): |difference| at or below which the model's judgement is "tie" (default 0).
Returns:
    accuracy (float), macro_f1 (float, over the classes that occur in references or predictions),
    and for each class c: c_precision, c_recall, c_f1, c_support (a class never predicted has precision 0).
"""


def judge(difference: float, tolerance: float) -> str:
    if abs(difference) <= tolerance:
        return "tie"
    return "better" if difference > 0 else "worse"


def scores(predicted, references):
    """Accuracy and per-class precision/recall/F1 of two label lists."""
    out = {
        "accuracy": sum(p == r for p, r in zip(predicted, references, strict=True)) / len(references)
        if references
        else 0.0
    }
    f1s = []
    for c in CLASSES:
        tp = sum(p == c and r == c for p, r in zip(predicted, references, strict=True))
        n_pred = sum(p == c for p in predicted)
        n_true = sum(r == c for r in references)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.update({f"{c}_precision": precision, f"{c}_recall": recall, f"{c}_f1": f1, f"{c}_support": n_true})
        if n_pred or n_true:
            f1s.append(f1)
    out["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairJudgement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"reward_differences": datasets.Value("float64"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, reward_differences, references, tolerance=0.0):
        unknown = set(references) - set(CLASSES)
        if unknown:
            raise ValueError(f"references must be one of {CLASSES}, got {sorted(unknown)}")
        predicted = [judge(d, tolerance) for d in reward_differences]
        return {**scores(predicted, references), "tolerance": tolerance, "pairs": len(references)}
