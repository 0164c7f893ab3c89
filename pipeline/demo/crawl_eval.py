"""Scoring the web-text stage's filter against the demo crawl's ground truth (crawl_labels.jsonl, written by crawl.py).

Junk ("drop") is the positive class: a record is predicted junk when its id is not among the stage's output
documents. Duplicate clusters (an original page and its exact or near copies) count right only when exactly one copy
is kept, whichever it is: when the original was dropped and a copy kept, the kept copy stands in for the original
(their labels are swapped before counting). So a cluster with none kept costs one false positive, and each extra
kept copy one false negative. The keep-all baseline (keep every record) is scored beside it.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of the positive class; 0.0 where a ratio is 0/0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def apply_cluster_rule(labels: list[dict[str, Any]], kept: set[str]) -> list[dict[str, Any]]:
    """Per-record truth after the cluster rule: rows {id, junk, junk_type, predicted_junk} in label order."""
    kept = {_norm(k) for k in kept}
    rows = [
        {
            "id": _norm(label["record_id"]),
            "junk": not label["keep"],
            "junk_type": label["junk_type"],
            "predicted_junk": _norm(label["record_id"]) not in kept,
        }
        for label in labels
    ]
    clusters: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        if label.get("cluster") is not None:
            clusters[label["cluster"]].append(i)
    for members in clusters.values():
        originals = [i for i in members if not rows[i]["junk"]]
        kept_members = [i for i in members if not rows[i]["predicted_junk"]]
        if len(originals) == 1 and kept_members and originals[0] not in kept_members:
            original, stand_in = rows[originals[0]], rows[kept_members[0]]
            for key in ("junk", "junk_type"):
                original[key], stand_in[key] = stand_in[key], original[key]
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Confusion counts, precision/recall/F1 (junk positive) and recall per junk type."""
    tp = sum(r["junk"] and r["predicted_junk"] for r in rows)
    fp = sum(not r["junk"] and r["predicted_junk"] for r in rows)
    fn = sum(r["junk"] and not r["predicted_junk"] for r in rows)
    tn = len(rows) - tp - fp - fn
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if r["junk"]:
            by_type[r["junk_type"]][0] += r["predicted_junk"]
            by_type[r["junk_type"]][1] += 1
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "recall_by_type": {t: round(hit / n, 4) for t, (hit, n) in sorted(by_type.items())},
        "junk_by_type": {t: n for t, (_, n) in sorted(by_type.items())},
    }


def cluster_summary(labels: list[dict[str, Any]], kept: set[str]) -> dict[str, int]:
    """How many duplicate clusters kept exactly one copy, none, or several."""
    counts: Counter = Counter()
    for label in labels:
        if label.get("cluster") is not None:
            counts[label["cluster"]] += _norm(label["record_id"]) in kept
    kept_per_cluster = list(counts.values())
    return {
        "clusters": len(kept_per_cluster),
        "exactly_one_kept": sum(k == 1 for k in kept_per_cluster),
        "none_kept": sum(k == 0 for k in kept_per_cluster),
        "several_kept": sum(k > 1 for k in kept_per_cluster),
    }


def evaluate(labels: list[dict[str, Any]], kept: set[str], removed_by: dict[str, str] | None = None) -> dict[str, Any]:
    """The filter's scores, the keep-all baseline, the cluster counts, and (given `removed_by`) which step dropped
    each wrongly dropped good page and each caught junk type."""
    kept = {_norm(k) for k in kept}
    every = {_norm(label["record_id"]) for label in labels}
    report: dict[str, Any] = {
        "positive_class": "junk (drop)",
        "records": len(labels),
        "filter": score(apply_cluster_rule(labels, kept)),
        "keep_all": score(apply_cluster_rule(labels, every)),
        "clusters": cluster_summary(labels, kept),
        "cluster_rule": "a duplicate cluster counts right only when exactly one copy is kept (any copy)",
    }
    if removed_by is not None:
        removed_by = {_norm(k): v for k, v in removed_by.items()}
        dropped: dict[str, Counter] = defaultdict(Counter)
        for row in apply_cluster_rule(labels, kept):
            if row["predicted_junk"]:
                group = row["junk_type"] if row["junk"] else "good (false positive)"
                dropped[group][removed_by.get(row["id"], "not read or no text extracted")] += 1
        report["removed_by_step"] = {group: dict(counter.most_common()) for group, counter in sorted(dropped.items())}
    return report


def evaluate_output(labels_path: Path, final: Path, removed_dir: Path | None = None) -> dict[str, Any]:
    """Score the web-text stage's `final/` (train + validation parquet) against the crawl labels file."""
    import pyarrow.parquet as pq

    labels = [json.loads(line) for line in Path(labels_path).read_text().splitlines() if line.strip()]
    kept = set()
    for file in sorted(Path(final).glob("*/*.parquet")):
        kept.update(pq.read_table(file, columns=["id"]).column("id").to_pylist())
    return evaluate(labels, kept, read_removed(removed_dir) if removed_dir and removed_dir.is_dir() else None)


def read_removed(removed_dir: Path) -> dict[str, str]:
    """id -> the step that removed it, from the web-text stage's work/removed/<step>/*.jsonl.gz."""
    removed = {}
    for file in sorted(removed_dir.glob("*/*.jsonl.gz")):
        with gzip.open(file, "rt") as fh:
            for line in fh:
                if line.strip():
                    removed[str(json.loads(line)["id"])] = file.parent.name
    return removed


def _norm(record_id: str) -> str:
    return str(record_id).strip().strip("<>")
