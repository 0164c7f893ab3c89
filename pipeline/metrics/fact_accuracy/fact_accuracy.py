"""fact_accuracy: does a generated answer state the gold fact (and no competing value)?

A local `evaluate` metric module, loaded offline by path:

    import evaluate
    metric = evaluate.load("pipeline/metrics/fact_accuracy")
    metric.compute(predictions=["The capital of Veloria is Marnis."], references=["Marnis"])
    # {'fact_accuracy': 1.0, 'correct': 1, 'total': 1}

An answer is correct when the gold value appears in it as a whole word or phrase (case-insensitive; "Marnis" does
not match "Marnisk"), and none of the optional `distractors` (the other values the relation takes, e.g. the other
capitals) does: listing every capital is not knowing the capital.
"""

import re

import datasets
import evaluate

_DESCRIPTION = "Share of answers that state the gold value as a whole word and no distractor value."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): the gold value for each answer.
    distractors (list of list of str, optional): wrong values per answer; stating any of them makes it wrong.
Returns:
    fact_accuracy (float): correct / total (0.0 for no answers).
    correct (int): answers judged correct.
    total (int): answers judged.
"""


def states(text: str, value: str) -> bool:
    """True when `value` occurs in `text` as a whole word or phrase, ignoring case."""
    value = value.strip()
    if not value:
        return False
    return re.search(rf"(?<![\w-]){re.escape(value.lower())}(?![\w-])", text.lower()) is not None


def is_correct(prediction: str, reference: str, distractors=()) -> bool:
    return states(prediction, reference) and not any(
        states(prediction, d) for d in distractors if d.strip().lower() != reference.strip().lower()
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FactAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, distractors=None):
        if distractors is None:
            distractors = [()] * len(predictions)
        if len(distractors) != len(predictions):
            raise ValueError(f"distractors has {len(distractors)} rows for {len(predictions)} predictions")
        correct = sum(is_correct(p, r, d) for p, r, d in zip(predictions, references, distractors, strict=True))
        total = len(predictions)
        return {"fact_accuracy": correct / total if total else 0.0, "correct": correct, "total": total}
