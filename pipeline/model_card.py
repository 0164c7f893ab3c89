"""The model card (README.md) of a published adapter: Hub metadata, how it was trained, lineage, data, limits.

Everything comes from the stage's `stage.json` and those of the stages it was built from (followed through their
`inputs`), plus `published.json` (where earlier stages were published) and the project's `data_cards/`.
`build_model_card` is pure: it takes what `pipeline.publish` gathered and returns the text.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

STAGE_TITLES = {
    "webtext": "Web-text filtering",
    "pretrain": "Causal-LM pretraining",
    "sft": "Supervised fine-tuning (LoRA)",
    "reward": "Reward model",
    "ppo": "PPO policy",
}
TASK_TYPES = {"sft": "text-generation", "ppo": "text-generation", "reward": "text-classification"}
STAGE_TAGS = {"sft": ["sft"], "reward": ["reward-model"], "ppo": ["ppo", "rlhf"]}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_METRICS = 40


@dataclass
class LineageNode:
    """One model or stage the published adapter derives from (or the adapter itself)."""

    stage: str  # a pipeline stage, "hub" for a model named by its Hub id, or "local" for a model directory
    path: str  # the stage's final/, the Hub id, or the local model directory
    role: str = ""  # how its child used it: "base", "reward_model", ... ("" for the published stage itself)
    config_hash: str | None = None
    contents: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] | None = None  # the published.json entry of this exact result, if any


@dataclass
class CardInputs:
    """Everything the card says, gathered by `pipeline.publish`."""

    repo_id: str
    revision: str
    stage: str
    record: dict[str, Any]  # the stage's stage.json
    lineage: list[LineageNode]  # roots first, the published stage last
    license: str
    base_model: str | None  # Hub id the adapter attaches to, when one is known
    datasets: list[str]  # Hub dataset ids named anywhere in the lineage
    data_cards: list[tuple[str, str]]  # (dataset name, path in the repo) of the uploaded data cards
    missing_data_cards: list[str]  # datasets named in the lineage without a card
    files: list[str]  # paths in the repo, for the "files" section
    endpoint: str = "https://huggingface.co"
    run_dir: str = ""  # local paths under it are shown as RUN_DIR/... (no local directory names in public cards)
    root_model: str = ""  # the model the run started from: a Hub id, a local model's name, or "" (pretrained here)
    default_settings: dict[str, Any] = field(default_factory=dict)  # flattened recipe defaults: the card lists changes
    chat_format: str = ""  # one exchange as the shipped tokenizer's chat template renders it, and whose template


def is_hub_id(value: str) -> bool:
    """True for `org/name` strings that are not an existing local path."""
    return bool(_HUB_ID.match(value)) and not os.path.exists(value)


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric metrics, nested keys joined with '.' (booleans and strings left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out


def build_model_card(card: CardInputs) -> str:
    """The README.md text: YAML metadata block, then the body."""
    return f"---\n{card_metadata(card).to_yaml()}\n---\n\n{card_body(card)}"


def card_metadata(card: CardInputs) -> ModelCardData:
    stage = card.stage
    task = TASK_TYPES.get(stage, "text-generation")
    dataset = evaluation_set(card.record, stage)
    results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset.split(" ")[0],
            dataset_name=dataset if is_hub_id(dataset) else f"{dataset}, {stage} evaluation",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in list(flat_metrics(card.record.get("metrics", {})).items())[:_MAX_METRICS]
    ]
    return ModelCardData(
        base_model=card.base_model,
        library_name="peft",
        license=card.license,
        datasets=card.datasets or None,
        tags=["peft", "lora", "rlhf-pipeline", *STAGE_TAGS.get(stage, [stage])],
        pipeline_tag=task,
        model_name=card.repo_id,
        eval_results=results or None,
    )


def card_body(card: CardInputs) -> str:
    parts = [
        _intro(card),
        _lineage_section(card),
        _training_section(card),
        _metrics_section(card),
        _usage_section(card),
        _data_section(card),
        _intended_use_section(card),
        _limitations_section(card),
        _files_section(card),
    ]
    return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Sections


def _intro(card: CardInputs) -> str:
    title = STAGE_TITLES.get(card.stage, card.stage)
    return (
        f"# {card.repo_id}\n\n"
        f"A LoRA adapter from the **{card.stage}** stage ({title}) of "
        f"rlhf-pipeline, the InstructGPT recipe end to end: web-text pretraining, LoRA SFT, "
        f"a reward model from rankings with ties, and PPO. It attaches to {_base_phrase(card)}; see the lineage "
        f"below for the models it was built from. Stage config hash `{card.record.get('config_hash')}`."
    )


def _model_link(card: CardInputs, name: str) -> str:
    return f"[{name}]({card.endpoint}/{name})" if is_hub_id(name) else f"`{name}`"


def _base_phrase(card: CardInputs) -> str:
    """What the adapter attaches to, named: a Hub model, or the model this run built from the user's base."""
    if card.base_model:
        return _model_link(card, card.base_model)
    built = {"sft": "the model", "pretrain": "the model"}.get(card.stage, "the merged SFT model")
    if card.root_model:
        return f"{built} this run fine-tuned from {_model_link(card, card.root_model)}"
    return f"{built} this run pretrained from scratch and fine-tuned"


def _lineage_section(card: CardInputs) -> str:
    rows = ["| step | stage | used as | config hash | published |", "|---|---|---|---|---|"]
    for i, node in enumerate(card.lineage, 1):
        if node.stage == "hub":
            where, what = f"[{node.path}]({card.endpoint}/{node.path})", "Hub model"
        elif node.stage == "local":
            where, what = f"`{node.path}` (a local model, not on the Hub)", "base model"
        elif node is card.lineage[-1]:
            where, what = "this repository", STAGE_TITLES.get(node.stage, node.stage)
        elif node.published:
            entry = node.published
            where = f"[{entry['repo_id']}@{entry['commit'][:10]}]({entry['url']})"
            what = STAGE_TITLES.get(node.stage, node.stage)
        else:
            where = "not published (a full model or a local result; `rlhf publish` uploads adapters)"
            where = "not published" if node.stage in ("sft", "reward", "ppo") else where
            what = STAGE_TITLES.get(node.stage, node.stage)
        rows.append(f"| {i} | {what} | {node.role or 'this adapter'} | `{node.config_hash or '-'}` | {where} |")
    chain = " → ".join(("base: " + n.path) if n.stage in ("hub", "local") else n.stage for n in card.lineage)
    return "## Lineage\n\n" + f"{chain}\n\n" + "\n".join(rows)


def _training_section(card: CardInputs) -> str:
    record = card.record
    settings = record.get("settings", {})
    changed = {k: v for k, v in settings.items() if k not in card.default_settings or card.default_settings[k] != v}
    rows = ["| setting | value |", "|---|---|"]
    rows += [f"| `{k}` | `{_show(v, card.run_dir)}` |" for k, v in sorted(changed.items())]
    inputs = record.get("inputs", {})
    input_lines = [
        f"- `{role}`: `{_path(entry.get('path', ''), card.run_dir)}`" for role, entry in sorted(inputs.items())
    ]
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
    hardware = record.get("hardware", {})
    hw = f"{hardware.get('world_size', 1)} process(es)"
    if hardware.get("cuda_devices"):
        hw += " on " + ", ".join(sorted(set(hardware["cuda_devices"])))
    return "\n".join(
        [
            "## How it was trained",
            "",
            f"Stage `{card.stage}` of rlhf-pipeline, finished {record.get('finished_at', '?')} "
            f"(git commit `{record.get('git_commit') or 'unknown'}`), {hw}. Contents: `{record.get('contents', '?')}`.",
            "",
            "Inputs:",
            *(input_lines or ["- none"]),
            "",
            f"Settings that decide the result and differ from the defaults (recipe keys; `rlhf {card.stage} RECIPE "
            f"key=value` sets them; the other {len(settings) - len(changed)} are at their defaults, all listed in "
            "`stage.json`):",
            "",
            *rows,
            "",
            f"Software: {versions}.",
        ]
    )


def _metrics_section(card: CardInputs) -> str:
    metrics = flat_metrics(card.record.get("metrics", {}))
    if not metrics:
        return "## Evaluation\n\nThe stage recorded no numeric metrics."
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    skipped = card.record.get("metrics", {}).get("judge")
    note = f"\n\nNot measured: {skipped}." if isinstance(skipped, str) else ""
    return (
        f"## Evaluation\n\nMeasured by the stage at the end of training (`stage.json`) on "
        f"{evaluation_set(card.record, card.stage)}:\n\n" + "\n".join(rows) + note
    )


def _usage_section(card: CardInputs) -> str:
    base = card.base_model or "PATH/TO/BASE_MODEL"
    rev = "" if card.revision == "main" else f', revision="{card.revision}"'
    if card.stage == "reward":
        load = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels=1)\n'
            f'model = PeftModel.from_pretrained(base, "{card.repo_id}"{rev})  # the score head is in the adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{card.repo_id}"{rev})'
        )
        note = (
            "The reward is the score of the last non-padding token of `prompt + response` in the chat format. "
            "`reward_stats.json` holds the mean and standard deviation of rewards on SFT-policy responses, used "
            "to normalise rewards during PPO."
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{card.repo_id}"{rev})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{card.repo_id}"{rev})\n'
            f'messages = [{{"role": "user", "content": "{_example_question(card)}"}}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            "    messages, add_generation_prompt=True, return_tensors='pt', return_dict=True\n"
            ")\n"
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))"
        )
        note = "Prompts use the chat template shipped with the tokenizer (`tokenizer.apply_chat_template`)."
    if card.chat_format:
        note += f"\n\n{card.chat_format}"
    where = (
        f"The adapter attaches to `{card.base_model}`."
        if card.base_model
        else f"The model this adapter attaches to ({_base_phrase(card)}) is not on the Hub: replace "
        "`PATH/TO/BASE_MODEL` with its local directory. For reward and PPO adapters that is the SFT model with its "
        "adapter merged (the run's `sft/final/merged/`, or "
        "`PeftModel.from_pretrained(sft_base, SFT_ADAPTER).merge_and_unload()`)."
    )
    return f"## How to use\n\n{where}\n\n```python\n{load}\n```\n\n{note}"


def _data_section(card: CardInputs) -> str:
    lines = ["## Training data", ""]
    if card.data_cards:
        lines.append("Data cards of the datasets used along the lineage (uploaded with the adapter):")
        lines.append("")
        lines += [f"- [{name}]({path})" for name, path in card.data_cards]
    if card.missing_data_cards:
        lines.append("")
        lines.append(
            "Datasets without a data card in `data_cards/`: "
            + ", ".join(f"`{dataset_name(d)}`" for d in card.missing_data_cards)
        )
    if not card.data_cards and not card.missing_data_cards:
        lines.append("The stage records no dataset.")
    return "\n".join(lines)


def _intended_use_section(card: CardInputs) -> str:
    uses = {
        "sft": "a chat policy for the domain of its demonstrations, and the starting point of reward modelling and PPO",
        "reward": "scoring responses to prompts of the domain it was trained on, as the reward of PPO or to rerank samples",
        "ppo": "a chat policy aligned to the reward model, for research on RLHF and for comparison with the SFT policy",
    }
    use = uses.get(card.stage, "research on the alignment pipeline")
    return (
        "## Intended use\n\n"
        f"Research and teaching: {use}. It is a small model trained by a reproducible recipe, not a product: it is "
        "not meant for decisions about people, for medical, legal or financial advice, or for unattended use."
    )


def _limitations_section(card: CardInputs) -> str:
    items = ["Answers can be fluent and wrong; facts outside the training data are guessed."]
    if any(node.stage in ("webtext", "pretrain") for node in card.lineage):
        items.insert(
            0,
            "Pretraining data is filtered web text: filters remove much, but not all, boilerplate, spam and toxic "
            "pages, and what remains carries the biases of the pages kept (the language, topics and views that "
            "were crawled).",
        )
    elif card.root_model:
        items.insert(0, f"It inherits what its base model ({card.root_model}) learnt, biases included.")
    if _uses_demo(card):
        items.append(
            "The demo world is invented: its countries, facts and annotators are simulated, so scores measured on it "
            "say how well the recipe works, not how a model behaves on real users."
        )
    if card.stage == "reward":
        items.append(
            "A reward model only reflects its annotators' rankings, including their noise and ties; outside that "
            "distribution its scores are unreliable, and a policy optimised hard against it finds its blind spots "
            "(reward hacking)."
        )
    if card.stage == "ppo":
        items.append(
            "PPO optimises the reward model's score, not the truth: with a weak KL penalty the policy can drift toward "
            "whatever the reward model over-rates. Compare gold or human judgements with the SFT policy before use."
        )
    return "## Bias, risks and limitations\n\n" + "\n".join(f"- {item}" for item in items)


def _files_section(card: CardInputs) -> str:
    return "## Files\n\n" + "\n".join(f"- `{f}`" for f in card.files)


# --------------------------------------------------------------------------------------------------------------
# Helpers


# What each stage evaluates on: (the setting naming the held-out data, the data it is held out of when unset).
EVALUATION_SETS = {
    "sft": ("sft.eval_split", "sft.dataset"),
    "reward": (None, "reward.dataset"),
    "ppo": ("ppo.eval_dataset", "ppo.dataset"),
    "pretrain": ("pretrain.dataset", None),
    "webtext": ("webtext.input", None),
}


def dataset_name(value: str) -> str:
    """How a card names a dataset: a Hub id as it is, the demo world by name, a local file or folder by its name only
    (no local directories in a public card)."""
    if value == "demo":
        return "the demo world (invented, generated by rlhf-pipeline)"
    if is_hub_id(value):
        return value
    return Path(value).name or value


def evaluation_set(record: dict[str, Any], stage: str) -> str:
    """The held-out data a stage's metrics were measured on, named for a card."""
    settings = record.get("settings", {})
    own, pool = EVALUATION_SETS.get(stage, (None, f"{stage}.dataset"))
    if own and isinstance(settings.get(own), str) and settings[own]:
        if own == "sft.eval_split" and not Path(settings[own]).suffix and isinstance(settings.get(pool), str):
            return f"{dataset_name(settings[pool])} ({settings[own]} split)"  # a Hub split name
        return dataset_name(settings[own])
    if pool and isinstance(settings.get(pool), str) and settings[pool]:
        return f"{dataset_name(settings[pool])} (held-out part)"
    return "the stage's own held-out data"


def _example_question(card: CardInputs) -> str:
    return (
        "What is the capital of Veloria?" if _uses_demo(card) else "Explain in two sentences what a reward model is."
    )


def _uses_demo(card: CardInputs) -> bool:
    return any(name.startswith("demo") for name, _ in card.data_cards) or any(
        v == "demo" for v in card.record.get("settings", {}).values()
    )


def _path(value: str, run_dir: str = "") -> str:
    """A local path as RUN_DIR/... when under the run directory, else by its last part only: no local directory
    names in a public card. Hub ids and other text are shown as they are."""
    if not value or is_hub_id(value) or ("/" not in value and "\\" not in value):
        return value
    if run_dir:
        with contextlib.suppress(ValueError, OSError):
            return str(Path("RUN_DIR") / Path(value).resolve().relative_to(Path(run_dir).resolve()))
    return Path(value).name or value


def _show(value: Any, run_dir: str = "") -> str:
    text = (
        _path(value, run_dir)
        if isinstance(value, str)
        else repr(value)
        if not isinstance(value, (int, float))
        else str(value)
    )
    return text.replace("|", "\\|")
