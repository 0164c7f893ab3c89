"""Metric modules shipped inside the project: `evaluate.load` of a Hub metric cannot work offline, a local path can.

Each metric is a directory `pipeline/metrics/<name>/<name>.py` holding an `evaluate.Metric`; load it with
`load_metric("<name>")` (or `evaluate.load("<path to that directory>")`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import UserError

METRICS_DIR = Path(__file__).parent


def load_metric(name: str) -> Any:
    """The shipped `evaluate` metric `name` (e.g. "fact_accuracy"), loaded from its directory."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        shipped = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise UserError(f"no metric '{name}' in {METRICS_DIR} (shipped metrics: {', '.join(shipped)})")
    return evaluate.load(str(path), keep_in_memory=True)
