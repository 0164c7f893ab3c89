"""Instruction data for SFT: read conversations in any of the common layouts and bring them to one messages form.

Accepted record layouts (one per row, from jsonl, parquet or a Hub dataset id):

- conversational: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (OpenAI chat format,
  multi-turn); ShareGPT's `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}` too;
- prompt/completion: `{"prompt": str | messages, "completion": str | messages}`;
- Alpaca: `{"instruction": str, "input": str (optional), "output": str}` (input is appended to the instruction).

Every record becomes `{"messages": [{"role", "content"}, ...]}`. Bad records are skipped and counted, never fatal
one by one: a conversation with no assistant turn, an empty conversation, an unknown role, a malformed message or
line, and (given a tokenizer) a conversation its chat template cannot render. The summary names the first record of
each kind; when nothing is left the error says why.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class BadRecord(Exception):
    """A record that cannot become a training conversation; `kind` groups it in the summary."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class SkipReport:
    """How many records were read, kept and skipped (by kind, with the first offending record of each kind)."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, where: str, error: BadRecord) -> None:
        self.skipped[error.kind] += 1
        self.first.setdefault(error.kind, f"{where}: {error}")

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: kept all {self.kept} conversations"
        kinds = "; ".join(f"{n} {kind} (first: {self.first[kind]})" for kind, n in self.skipped.most_common())
        return f"{self.source}: kept {self.kept} of {self.read} records, skipped {sum(self.skipped.values())}: {kinds}"

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped)}


# --------------------------------------------------------------------------------------------------------------
# One record -> messages


def to_messages(record: Any) -> list[dict[str, str]]:
    """The conversation of one record in the messages form, checked; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("malformed record", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        messages = _from_sharegpt(record["conversations"])
    elif "prompt" in record and "completion" in record:
        messages = _as_turns(record["prompt"], "user") + _as_turns(record["completion"], "assistant")
    elif "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise BadRecord("malformed message", "instruction and input must be strings")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        raise BadRecord(
            "unknown layout", f"fields {sorted(record)[:8]} (need messages, prompt/completion or instruction/output)"
        )
    return check_messages(messages)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Keep `role` and `content` of each message after checking them; raises `BadRecord`."""
    if messages is None or (isinstance(messages, list) and not messages):
        raise BadRecord("empty conversation")
    if not isinstance(messages, list):
        raise BadRecord("malformed message", f"messages must be a list, got {type(messages).__name__}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord("malformed message", f"message {i} needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord("unknown role", f"message {i} has role {role!r} (valid roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord("malformed message", f"message {i} content is {type(content).__name__}, not text")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRecord("no assistant turn", "nothing to learn from")
    if all(not m["content"].strip() for m in clean if m["role"] == "assistant"):
        raise BadRecord("blank assistant turns", "every assistant turn is empty")
    return clean


def _as_turns(value: Any, role: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise BadRecord("malformed message", f"{role} side must be a string or a list of messages")


def _from_sharegpt(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise BadRecord("malformed message", "conversations must be a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("malformed message", f"turn {i} needs 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise BadRecord("unknown role", f"turn {i} is from {turn['from']!r} (valid: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def check_renders(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise `BadRecord` when the tokenizer's chat template fails on this conversation."""
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raises TemplateError, templates raise_exception with any message
        raise BadRecord("unrenderable by the chat template", str(exc).splitlines()[0][:120]) from None


# --------------------------------------------------------------------------------------------------------------
# Reading sources


def read_records(
    source: str | Path, split: str = "train", hub_config: str | None = None, what: str = "sft.dataset"
) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs from a jsonl/json/parquet file, a directory of them, or a Hub dataset split.

    A line that is not JSON yields a `BadRecord` in place of the record.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"{what}: {path} holds no .jsonl, .json or .parquet files")
        for file in files:
            yield from _read_file(file)
    elif path.suffix in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"{what}: file not found: {path} (give a .jsonl/.parquet file or a Hub dataset id)")
        yield from _read_file(path)
    else:
        yield from _read_hub(text, split, hub_config, what)


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    with path.open(encoding="utf-8") as fh:
        head = fh.read(1)
        fh.seek(0)
        if path.suffix == ".json" and head == "[":  # a JSON array of records
            for i, row in enumerate(json.load(fh)):
                yield f"{path} item {i}", row
            return
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{n}", BadRecord("invalid JSON", exc.msg)


def _read_hub(dataset_id: str, split: str, hub_config: str | None, what: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        # streamed: a `limit` then reads only the rows it needs, and nothing is stored twice
        rows = iter(datasets.load_dataset(dataset_id, name=hub_config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as exc:  # datasets raises many types for a missing id, split or network
        raise UserError(
            f"{what}: cannot load {dataset_id!r} split {split!r}: {str(exc).splitlines()[0][:160]} "
            "(give a local .jsonl/.parquet file or a Hub dataset id reachable from this machine)"
        ) from None
    if first is None:
        return
    yield f"{dataset_id}[{split}] row 0", first
    for i, row in enumerate(rows, start=1):
        yield f"{dataset_id}[{split}] row {i}", row


# --------------------------------------------------------------------------------------------------------------
# Loading and splitting


def load_conversations(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: str = "train",
    hub_config: str | None = None,
    limit: int = -1,
    what: str = "sft.dataset",
) -> tuple[Dataset, SkipReport]:
    """Read `source`, convert each record to messages, skip and count bad ones; return the dataset and the report.

    Args:
        tokenizer: when given, conversations its chat template cannot render are skipped too.
        limit: keep at most this many good conversations (-1: all).
    """
    report = SkipReport(source=str(source))
    rows = []
    for where, record in read_records(source, split, hub_config, what):
        if 0 <= limit <= report.kept:
            break
        report.read += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            messages = to_messages(record)
            if tokenizer is not None:
                check_renders(messages, tokenizer)
        except BadRecord as bad:
            report.skip(where, bad)
            continue
        rows.append({"messages": messages})
        report.kept += 1
    if not rows:
        reason = f"; {report.summary()}" if report.read else " (it is empty)"
        raise UserError(f"{what}: no usable conversation in {source}{reason}")
    (logger.warning if report.skipped else logger.info)("%s", report.summary())
    return Dataset.from_list(rows), report


def split_conversations(data: Dataset, eval_share: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `eval_share` of the conversations (at least one when there are two or more), seeded."""
    if eval_share <= 0 or len(data) < 2:
        return data, None
    n_eval = min(len(data) - 1, max(1, round(len(data) * eval_share)))
    parts = data.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
