"""The demo's headline figures over several seeds: median and range, the table the README shows.

Runs `rlhf run RECIPE seed=S run_dir=WORK/seed-S` for each seed (one after the other, or --jobs at once; a fixed thread
count each), reads the figures from each run's stage.json files, and writes benchmarks/results/demo_figures.{json,md}
with the date, the commit, the versions and the command. With --readme it also replaces the table between the README's
`<!-- demo-figures -->` markers. Nothing is timed by a test; the wall time of each run is measured here.

    .venv/bin/python benchmarks/demo_figures.py --seeds 1234 7 99 --readme
    .venv/bin/python benchmarks/demo_figures.py --seeds 1 2 3 --work-dir /tmp/figs ppo.learning_rate=2e-3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = ("<!-- demo-figures -->", "<!-- /demo-figures -->")

# (label, stage, dotted path into stage.json's metrics or a function of the metrics, goal text)
FIGURES = [
    ("SFT: held-out facts answered right", "sft", "heldout_accuracy", ""),
    ("reward: pairwise accuracy, templated responses", "reward", "test.templated.accuracy", ">= 0.95"),
    ("reward: pairwise accuracy, sampled SFT responses", "reward", "test.sampled.accuracy", ""),
    ("reward: keyword baseline, sampled SFT responses", "reward", "test.sampled.baselines.keyword", ""),
    ("reward: margin over the keyword baseline, sampled", "reward", "sampled_margin", ">= 0.05"),
    ("PPO: gold win rate against SFT", "ppo", "gold_win_rate", ">= 0.70"),
    ("PPO: KL to SFT, nats per response", "ppo", "kl_to_reference", "<= kl_target (6)"),
    ("PPO: insult rate on adversarial prompts, SFT", "ppo", "sft_insult_rate", ""),
    ("PPO: insult rate on adversarial prompts, PPO", "ppo", "ppo_insult_rate", "< SFT's on every seed"),
    ("demo wall time, minutes (set-up excluded; threads in the line above)", "run", "minutes", "<= 10 on 2 cores"),
]


def metric(metrics: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def figures_of(run_dir: Path, minutes: float) -> dict[str, Any]:
    """The headline figures of one finished demo run (the last round's reward model and PPO policy)."""
    stages = {p.parent.parent.name: json.loads(p.read_text())["metrics"] for p in run_dir.glob("*/final/stage.json")}
    last = {
        name: max((s for s in stages if s.split("-")[0] == name), key=lambda s: (len(s), s))
        for name in ("reward", "ppo")
    }
    out: dict[str, Any] = {}
    for label, stage, path, _ in FIGURES:
        if stage == "run":
            out[label] = round(minutes, 2)
            continue
        metrics = stages.get(last.get(stage, stage), {})
        if path == "sampled_margin":
            accuracy, keyword = (
                metric(metrics, "test.sampled.accuracy"),
                metric(metrics, "test.sampled.baselines.keyword"),
            )
            out[label] = None if accuracy is None or keyword is None else accuracy - keyword
        else:
            out[label] = metric(metrics, path)
    out["versions"] = json.loads((run_dir / "sft" / "final" / "stage.json").read_text()).get("versions")
    return out


def run_seed(recipe: Path, seed: int, work: Path, threads: int, overrides: list[str]) -> dict[str, Any]:
    run_dir = work / f"seed-{seed}"
    command = [str(Path(sys.executable).parent / "rlhf"), "run", str(recipe), f"seed={seed}", f"run_dir={run_dir}",
               *overrides, "--no-report"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.time()
    log = (work / f"seed-{seed}.log").open("w")
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {result.returncode}); see {work / f'seed-{seed}.log'}")
    return figures_of(run_dir, (time.time() - started) / 60)


def summarise(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, _, _, goal in FIGURES:
        values = [v[label] for v in per_seed.values() if isinstance(v.get(label), (int, float))]
        row = {"figure": label, "goal": goal, "per_seed": {s: v.get(label) for s, v in per_seed.items()}}
        if values:
            row.update(median=statistics.median(values), min=min(values), max=max(values))
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], seeds: list[int], meta: dict[str, Any]) -> str:
    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = [f"Demo figures, median (range) over seeds {', '.join(map(str, seeds))}: {meta['date']}, commit "
             f"`{meta['commit'][:10]}`, `{meta['command']}` ({meta['threads']} thread(s) per run, "
             f"{meta.get('jobs', 1)} run(s) at once, {meta.get('cpu', 'CPU not recorded')}).", "",
             "| figure | median | range | " + " | ".join(f"seed {s}" for s in seeds) + " | goal |",
             "|---|---|---|" + "---|" * len(seeds) + "---|"]  # fmt: skip
    for row in rows:
        span = f"{fmt(row.get('min'))} - {fmt(row.get('max'))}"
        cells = " | ".join(fmt(row["per_seed"][s]) for s in seeds)
        lines.append(f"| {row['figure']} | {fmt(row.get('median'))} | {span} | {cells} | {row['goal'] or ''} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    readme.write_text(text[:start] + "\n" + table + text[end:])


def cpu_name() -> str:
    """The CPU's model name (the figures move with it: other float kernels, other sums)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every seed")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 7, 99])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/demo-figures"))
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (each with --threads threads)")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_figures")
    parser.add_argument("--readme", action="store_true", help="replace the README's figures table")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # the code the runs use: read before they start (a commit made while they run is not theirs)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = {
            s: pool.submit(run_seed, args.recipe, s, args.work_dir, args.threads, args.overrides) for s in args.seeds
        }
        per_seed = {seed: run.result() for seed, run in runs.items()}
    command = " ".join(
        [
            "python benchmarks/demo_figures.py",
            *map(str, ["--seeds", *args.seeds, "--threads", args.threads, "--jobs", args.jobs]),
            *args.overrides,
        ]
    )
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": command, "threads": args.threads,
            "jobs": args.jobs, "cpu": cpu_name(),
            "recipe": str(args.recipe.relative_to(ROOT)), "versions": next(iter(per_seed.values()))["versions"]}  # fmt: skip
    rows = summarise(per_seed)
    table = markdown(rows, args.seeds, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "figures": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("# Demo figures over seeds\n\n" + table)
    if args.readme:
        update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
