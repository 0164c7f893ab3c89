"""`rlhf report RUN_DIR`: one HTML page (and the same in markdown) with plots of every stage of a run.

Reads what the stages left in the run directory (`<stage>/final/stage.json`, `<stage>/metrics.jsonl`, the web-text
stage's `stats.json`, evaluation files) and writes `RUN_DIR/report/index.html`, `report.md` and PNG plots:
data-filter statistics, pretraining loss and perplexity, SFT loss and task score, reward-model accuracy, precision,
recall, F1 and reward histograms, PPO reward, gold score and KL curves, and the final table base vs SFT vs PPO.
Stages that have not run are listed as such.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

from pipeline.checkpoints import enclosing_run_dir, stage_seconds
from pipeline.data.prompts import prompt_text
from pipeline.errors import UserError
from pipeline.stages import pipeline_stages, split_stage
from pipeline.tracking import read_metrics

logger = logging.getLogger(__name__)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # cut short by a crash, a full disk or a copy
        raise _damaged(path, exc) from None


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: ValueError) -> UserError:
    """A stage's result file that does not parse: one line naming it (as read_stage_json does for stage.json)."""
    where = getattr(exc, "pos", getattr(exc, "start", 0))
    return UserError(
        f"{path} is damaged ({type(exc).__name__} at byte {where}); restore it, or run the stage again with --rerun"
    )


def run_stages(run_dir: Path) -> list[str]:
    """The run's stages in order: the five, then every later round's reward and PPO stage found in the run."""
    rounds = [int(p.name.rsplit("-", 1)[1]) for p in Path(run_dir).glob("ppo-*") if split_stage(p.name)[1] > 1]
    rounds += [int(p.name.rsplit("-", 1)[1]) for p in Path(run_dir).glob("reward-*") if split_stage(p.name)[1] > 1]
    return pipeline_stages(max(rounds, default=1))


def collect(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Everything the report shows, per stage: stage.json, metric records and the stage's evaluation files."""
    found: dict[str, dict[str, Any]] = {}
    for stage in run_stages(run_dir):
        sdir = run_dir / stage
        final = sdir / "final"
        found[stage] = {
            "record": _load_json(final / "stage.json"),
            "history": read_metrics(sdir / "metrics.jsonl"),
            "stats": _load_json(final / "stats.json"),
            "eval": _load_json(final / "eval.json"),
            "samples": _load_jsonl(final / "samples.jsonl"),
        }
    return found


class _Page:
    """Builds the HTML and markdown side by side."""

    def __init__(self, title: str):
        self.html = [
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        self.md = [f"# {title}", ""]

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def text(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def image(self, name: str, caption: str) -> None:
        self.html.append(
            f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        self.md += [f"![{caption}]({name})", ""]

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><tr>{cells}</tr>{body}</table>")
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
        self.md.append("")

    def write(self, out: Path) -> Path:
        (out / "report.md").write_text("\n".join(self.md))
        page = out / "index.html"
        page.write_text("\n".join(self.html) + "</body></html>\n")
        return page


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _series(history: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in history if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in points], [p[1] for p in points]


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(
    out: Path, name: str, history: list[dict[str, Any]], panels: list[tuple[str, list[str]]], x: str = "step"
) -> bool:
    """One figure with a panel per (title, keys); False when there is nothing to plot."""
    plt = _pyplot()
    panels = [(title, [k for k in keys if _series(history, k, x)[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            xs, ys = _series(history, key, x)
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return True


def _plot_bars(
    out: Path, name: str, title: str, labels: list[str], groups: dict[str, list[float]], ylabel: str = ""
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(labels) * max(1, len(groups))), 3.4))
    width = 0.8 / max(1, len(groups))
    for i, (group, values) in enumerate(groups.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=group)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(labels))], labels, rotation=20, fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def _plot_histograms(out: Path, name: str, title: str, samples: dict[str, list[float]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, values in samples.items():
        ax.hist(values, bins=30, alpha=0.55, label=label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def _metrics(stage: dict[str, Any]) -> dict[str, Any]:
    return (stage.get("record") or {}).get("metrics", {})


def write_report(run_dir: Path) -> Path:
    """Write the report of `run_dir`; return the HTML page."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} (give the run_dir of a recipe, e.g. runs/demo)")
    above = None if (run_dir / "config.yaml").is_file() else enclosing_run_dir(run_dir)
    if above is not None:
        raise UserError(f"{run_dir} is not a run directory (no config.yaml) but lies in one: give {above}")
    found = collect(run_dir)
    if not any(s["record"] or s["history"] for s in found.values()):
        raise UserError(f"{run_dir} has no stage results yet; run `rlhf run RECIPE` first")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(f"Run report: {run_dir.name}")
    _section_webtext(page, out, found["webtext"])
    _section_pretrain(page, out, found["pretrain"])
    _section_sft(page, out, found["sft"])
    for stage in found:
        name, round_no = split_stage(stage)
        title = f"round {round_no}, " if round_no > 1 else ""
        if name == "reward":
            _section_reward(page, out, found[stage], stage, f"Stage 3: reward model ({title}{stage})")
        elif name == "ppo":
            _section_ppo(page, out, found[stage], stage, f"Stage 4: PPO ({title}{stage})")
            _section_samples(page, found[stage])
    _section_final(page, found)
    _section_times(page, found)
    _section_versions(page, found)
    return page.write(out)


def _not_run(page: _Page, stage: dict[str, Any]) -> bool:
    if stage["record"] is None and not stage["history"]:
        page.text("Not run yet.")
        return True
    if stage["record"] is None:
        page.text("Not finished yet (no final/): the curves so far.")
    return False


def _section_webtext(page: _Page, out: Path, stage: dict[str, Any]) -> None:
    page.heading("Stage 1a: web text")
    if _not_run(page, stage):
        return
    steps = (stage["stats"] or {}).get("steps", [])
    if steps:
        labels = [s["step"] for s in steps]
        _plot_bars(
            out,
            "data_filters.png",
            "Documents left after each step",
            labels,
            {"documents": [s.get("documents_out") or 0 for s in steps]},
        )
        page.image("data_filters.png", "Documents out of each extraction, filter and dedup step")
        page.table(
            ["step", "docs in", "docs out", "tokens in", "tokens out"],
            [
                [s["step"], s.get("documents_in"), s.get("documents_out"), s.get("tokens_in"), s.get("tokens_out")]
                for s in steps
            ],
        )
    evaluation = stage["eval"] or {}
    if "filter" in evaluation:
        ours, base = evaluation["filter"], evaluation.get("keep_all", {})
        page.text("Junk (drop) as the positive class, against the demo crawl's ground truth:")
        page.table(
            ["", "precision", "recall", "F1"],
            [
                ["filters", ours["precision"], ours["recall"], ours["f1"]],
                ["keep-all baseline", base.get("precision"), base.get("recall"), base.get("f1")],
            ],
        )
        page.table(["junk type", "recall"], [[k, v] for k, v in ours.get("recall_by_type", {}).items()])


def _section_pretrain(page: _Page, out: Path, stage: dict[str, Any]) -> None:
    page.heading("Stage 1b: pretraining")
    if _not_run(page, stage):
        return
    history = [_with_perplexity(r) for r in stage["history"]]
    panels = [
        ("loss", ["loss", "eval_loss"]),
        ("perplexity", ["train_perplexity", "eval_perplexity"]),
        ("learning rate", ["learning_rate"]),
    ]
    if _plot_curves(out, "pretrain_loss.png", history, panels):
        page.image(
            "pretrain_loss.png", "Pretraining loss, perplexity (exp of the loss; train and held out), learning rate"
        )
    metrics = _metrics(stage)
    keys = ["perplexity", "unigram_perplexity", "trigram_perplexity", "perplexity_ratio_unigram", "cloze_accuracy"]
    present = [k for k in keys if k in metrics]
    if present:
        page.table(["metric", "value"], [[k, metrics[k]] for k in present])
    ppl = {
        k: metrics[k]
        for k in ("perplexity", "trigram_perplexity", "unigram_perplexity")
        if isinstance(metrics.get(k), (int, float))
    }
    if len(ppl) > 1:
        _plot_bars(
            out,
            "pretrain_perplexity.png",
            "Held-out perplexity (lower is better)",
            list(ppl),
            {"perplexity": list(ppl.values())},
        )
        page.image("pretrain_perplexity.png", "Held-out perplexity: the model against n-gram baselines")


def _with_perplexity(record: dict[str, Any]) -> dict[str, Any]:
    extra = {
        f"{'eval' if k == 'eval_loss' else 'train'}_perplexity": math.exp(min(v, 50.0))
        for k, v in record.items()
        if k in ("loss", "eval_loss") and isinstance(v, (int, float))
    }
    return {**record, **extra}


def _section_sft(page: _Page, out: Path, stage: dict[str, Any]) -> None:
    page.heading("Stage 2: supervised fine-tuning")
    if _not_run(page, stage):
        return
    if _plot_curves(out, "sft_loss.png", stage["history"], [("loss", ["loss", "eval_loss"])]):
        page.image("sft_loss.png", "SFT loss (train and held out)")
    metrics = _metrics(stage)
    scores = {k: v for k, v in metrics.items() if k.endswith("heldout_accuracy") and isinstance(v, (int, float))}
    if scores:
        _plot_bars(
            out,
            "sft_task_score.png",
            "Held-out fact questions answered correctly",
            list(scores),
            {"accuracy": list(scores.values())},
        )
        page.image("sft_task_score.png", "Task score on facts seen only in the crawl")
    keys = [
        "eval_loss",
        "heldout_accuracy",
        "base_heldout_accuracy",
        "gold_mean_score",
        "base_gold_mean_score",
        "dispreferred_share",
        "greedy_dispreferred_share",
        "gold_insulting_share",
        "gold_wrong_share",
        "gold_impolite_share",
        "train_runtime",
    ]
    page.table(["metric", "value"], [[k, metrics[k]] for k in keys if k in metrics])


def _section_reward(page: _Page, out: Path, stage: dict[str, Any], name: str = "reward", title: str = "") -> None:
    page.heading(title or "Stage 3: reward model")
    if _not_run(page, stage):
        return
    if _plot_curves(out, f"{name}_loss.png", stage["history"], [("K-wise loss", ["loss"])]):
        page.image(f"{name}_loss.png", "Reward-model training loss (mean over each prompt's strict pairs)")
    test = stage["eval"] or _metrics(stage).get("test") or {}
    groups = {name: value for name, value in test.items() if isinstance(value, dict) and "accuracy" in value}
    if not groups:
        page.text("No held-out metrics (reward.test_share is 0).")
        return
    page.text(
        f"Held-out prompts; pairs are judged against the gold ranking where there is one. Tie tolerance "
        f"{_fmt(test.get('tie_tolerance'))} (chosen on the validation split)."
    )
    page.table(
        [
            "responses",
            "pairs",
            "pairwise accuracy",
            "length baseline",
            "keyword baseline",
            "Kendall tau",
            "3-class accuracy",
            "macro F1",
        ],
        [
            [
                name,
                g.get("pairs"),
                g.get("accuracy"),
                g.get("baselines", {}).get("length"),
                g.get("baselines", {}).get("keyword"),
                g.get("kendall_tau"),
                g.get("judgement_accuracy"),
                g.get("judgement_macro_f1"),
            ]
            for name, g in groups.items()
        ],
    )
    overall = groups.get("all") or next(iter(groups.values()))
    classes = ["better", "worse", "tie"]
    scores = {m: [overall.get(f"judgement_{c}_{m}") or 0.0 for c in classes] for m in ("precision", "recall", "f1")}
    _plot_bars(out, f"{name}_prf.png", "Held-out pairs judged in both orders", classes, scores)
    page.image(f"{name}_prf.png", "Precision, recall and F1 per class (better / worse / tie), all held-out pairs")
    places = overall.get("rewards_by_place")
    if isinstance(places, dict) and any(places.values()):
        _plot_histograms(
            out, f"{name}_hist.png", "Held-out rewards by place in the ranking", {k: v for k, v in places.items() if v}
        )
        page.image(f"{name}_hist.png", "Rewards of the best-ranked, middle and worst-ranked held-out responses")


def _section_ppo(page: _Page, out: Path, stage: dict[str, Any], name: str = "ppo", title: str = "") -> None:
    page.heading(title or "Stage 4: PPO")
    if _not_run(page, stage):
        return
    history = [r for r in stage["history"] if "update" in r]
    scores = [
        ("reward-model and gold score", ["rm_score", "gold_score"]),
        ("KL to reference (nats/response)", ["kl"]),
        ("KL coefficient", ["kl_coef"]),
    ]
    if _plot_curves(out, f"{name}_curves.png", history, scores, x="update"):
        page.image(f"{name}_curves.png", "PPO per update (on each update's rollout): scores, KL and its coefficient")
    details = [
        ("policy", ["entropy", "clip_fraction", "approx_kl"]),
        ("value", ["value_loss", "explained_variance"]),
        ("seconds per update", ["time_generate", "time_score", "time_optimise"]),
    ]
    if _plot_curves(out, f"{name}_details.png", history, details, x="update"):
        page.image(
            f"{name}_details.png", "PPO per update: policy statistics, value fit, time generating vs optimising"
        )
    if _plot_gold_against_reward(out, f"{name}_gold_vs_rm.png", history):
        page.image(
            f"{name}_gold_vs_rm.png",
            "Gold score against reward-model score, update by update (Gao et al. 2023): while both rise the reward "
            "model is a good proxy; a gold score falling as the reward-model score keeps rising is over-optimisation",
        )
    evaluation = stage["eval"] or {}
    keys = [
        "eval_prompts",
        "gold_win_rate",
        "gold_wins",
        "gold_losses",
        "gold_ties",
        "sft_gold_score",
        "ppo_gold_score",
        "sft_rm_score",
        "ppo_rm_score",
        "kl_to_reference",
        "kl_target",
        "sft_insult_rate",
        "ppo_insult_rate",
        "adversarial_prompts",
        "sft_response_length",
        "ppo_response_length",
        "ppo_eos_rate",
    ]
    page.table(["held-out evaluation", "value"], [[k, evaluation[k]] for k in keys if k in evaluation])
    overopt = evaluation.get("overoptimisation") or {}
    if overopt.get("detected"):
        page.text(
            f"Over-optimisation detected at policy {overopt.get('at_policy')} (gold score "
            f"{_fmt(overopt.get('gold_before'))} -> {_fmt(overopt.get('gold_after'))} while the reward-model "
            f"score rose); best checkpoint by gold score: {(overopt.get('best') or {}).get('checkpoint')}."
        )
    elif overopt:
        page.text("No over-optimisation detected (reward-model score rising while the gold score falls).")


def _section_final(page: _Page, found: dict[str, dict[str, Any]]) -> None:
    """Base (pretrained) vs SFT vs PPO (of every round): the SFT stage compares base and SFT on its prompts, each PPO
    stage compares SFT and its policy on the held-out PPO prompts (one sampled response per prompt each)."""
    page.heading("Base vs SFT vs PPO")
    sft = _metrics(found["sft"])
    ppos = {s: found[s]["eval"] or {} for s in found if split_stage(s)[0] == "ppo" and found[s]["eval"]}
    first = next(iter(ppos.values()), {})
    if not sft and not ppos:
        page.text("SFT has not finished yet.")
        return
    rows = [["base", sft.get("base_heldout_accuracy"), sft.get("base_gold_mean_score"), None, None, None, None]]
    rows.append(["sft", sft.get("heldout_accuracy"), sft.get("gold_mean_score"), first.get("sft_gold_score"),
                 first.get("sft_rm_score"), first.get("sft_insult_rate"), 0.0 if first else None])  # fmt: skip
    for stage, ppo in ppos.items():
        rows.append([stage, None, None, ppo.get("ppo_gold_score"), ppo.get("ppo_rm_score"), ppo.get("ppo_insult_rate"),
                     ppo.get("kl_to_reference")])  # fmt: skip
    header = ["policy", "held-out fact accuracy (SFT eval)", "gold score (SFT eval prompts)",
              "gold score (PPO eval prompts)", "reward-model score (PPO eval; its own round's model)",
              "insult rate, adversarial prompts (PPO eval)", "KL to SFT, nats/response"]  # fmt: skip
    page.table(header, rows)
    for stage, ppo in ppos.items():
        if "gold_win_rate" in ppo:
            page.text(
                f"Gold win rate of {stage} against SFT: {_fmt(ppo['gold_win_rate'])} ({ppo.get('gold_wins')} wins, "
                f"{ppo.get('gold_losses')} losses, {ppo.get('gold_ties')} ties apart) on {ppo.get('eval_prompts')} "
                f"held-out prompts ({ppo.get('adversarial_prompts')} adversarial)"
                + (f", {ppo['eval_samples_per_prompt']} samples each" if ppo.get("eval_samples_per_prompt") else "")
                + "; KL target "
                f"{_fmt(ppo.get('kl_target'))}."
            )


def _section_times(page: _Page, found: dict[str, dict[str, Any]]) -> None:
    page.heading("Time per stage")
    rows = [[s, stage_seconds(_metrics(found[s]))] for s in found if found[s]["record"]]
    page.table(["stage", "seconds"], rows)


def _plot_gold_against_reward(out: Path, name: str, history: list[dict[str, Any]]) -> bool:
    """Each update's mean gold score against its mean reward-model score, joined in update order."""
    points = [(r["update"], r["rm_score"], r["gold_score"]) for r in history
              if isinstance(r.get("rm_score"), (int, float)) and isinstance(r.get("gold_score"), (int, float))]  # fmt: skip
    if len(points) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    updates, rm, gold = zip(*points, strict=True)
    ax.plot(rm, gold, color="#999", linewidth=0.8)
    dots = ax.scatter(rm, gold, c=updates, cmap="viridis", zorder=3)
    fig.colorbar(dots, ax=ax, label="update")
    ax.set_xlabel("reward-model score (rollout mean)")
    ax.set_ylabel("gold score (rollout mean)")
    ax.set_title("Gold against reward model over PPO")
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return True


# Held-out prompts shown side by side in the report: this many adversarial ones and this many others.
SHOWN_ADVERSARIAL, SHOWN_OTHER = 3, 3


def _section_samples(page: _Page, stage: dict[str, Any]) -> None:
    """A handful of held-out prompts (adversarial ones among them) with the SFT and PPO responses and their scores."""
    samples = stage.get("samples") or []
    if not samples:
        return
    page.heading("SFT and PPO side by side")
    samples = [s for s in samples if not s.get("sample")]  # the first sample of each prompt
    adversarial = [s for s in samples if s.get("kind") == "adversarial"][:SHOWN_ADVERSARIAL]
    others = [s for s in samples if s.get("kind") != "adversarial"][
        : SHOWN_OTHER + SHOWN_ADVERSARIAL - len(adversarial)
    ]
    judged = "sft_gold_score" in samples[0]
    page.text(
        "Held-out prompts, each answered once by the SFT policy and once by the PPO policy (sampled with the same "
        "random stream), with the reward model's score" + (" and the judge's (gold) score." if judged else ".")
    )
    header = ["prompt", "SFT response", "RM", "PPO response", "RM"]
    if judged:
        header = ["prompt", "SFT response", "RM", "gold", "PPO response", "RM", "gold"]
    rows = []
    for sample in adversarial + others:
        question = prompt_text(sample["prompt"])
        sft = [sample["sft"], sample.get("sft_rm_score")] + ([sample.get("sft_gold_score")] if judged else [])
        ppo = [sample["ppo"], sample.get("ppo_rm_score")] + ([sample.get("ppo_gold_score")] if judged else [])
        rows.append([question, *sft, *ppo])
    page.table(header, rows)


def _section_versions(page: _Page, found: dict[str, dict[str, Any]]) -> None:
    """The package versions each stage ran with (stage.json); a package whose version changed between stages is
    marked, since results are only reproducible with the same versions (constraints.txt pins them)."""
    records = {stage: (found[stage]["record"] or {}).get("versions") for stage in found}
    records = {stage: versions for stage, versions in records.items() if versions}
    if not records:
        return
    page.heading("Software")
    packages = list(dict.fromkeys(name for versions in records.values() for name in versions))
    rows = []
    for name in packages:
        seen = [records[stage].get(name) for stage in records]
        rows.append([name + (" (differs between stages)" if len(set(seen)) > 1 else ""), *seen])
    page.table(["package", *records], rows)


def versions_line(run_dir: Path) -> str:
    """The package versions of a run's stages in one line (those of its last finished stage; differences between
    stages are marked in the report)."""
    found = collect(Path(run_dir))
    versions = next(
        ((found[s]["record"] or {}).get("versions") for s in reversed(list(found)) if found[s]["record"]), None
    )
    if not versions:
        return "versions: no finished stage yet"
    differ = [name for name in versions if len({(found[s]["record"] or {}).get("versions", {}).get(name)
                                                for s in found if found[s]["record"]}) > 1]  # fmt: skip
    note = f" (differ between stages: {', '.join(differ)})" if differ else ""
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + note
