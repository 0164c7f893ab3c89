"""Instruction data for SFT: read conversations in any of the common layouts and bring them to one messages form.

Accepted record layouts (one per row, from jsonl, parquet or a Hub dataset id):

- conversational: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (OpenAI chat format,
  multi-turn); ShareGPT's `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}` too. Roles are
  read as datasets spell them (`User`, `human`, `gpt`, `bot`, Gemma's `model`: see `ROLE_NAMES` in prompts.py);
- prompt/completion: `{"prompt": str | messages, "completion": str | messages}`;
- Alpaca: `{"instruction": str, "input": str (optional), "output": str}` (input is appended to the instruction).

Every record becomes `{"messages": [{"role", "content"}, ...]}`. Bad records are skipped and counted, never fatal
one by one: a conversation with no assistant turn, an empty conversation, an unknown role, tool use (a `tool` turn or
an assistant's `tool_calls`: not trained on), a malformed message or line, and (given a tokenizer) a conversation its
chat template cannot render. The summary names the first record of each kind; when nothing is left the error says
why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from pipeline.data.prompts import check_messages, from_sharegpt, instruction_turn
from pipeline.data.records import BadRecord, SkipReport, read_records
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# One record -> messages


def to_messages(record: Any) -> list[dict[str, str]]:
    """The conversation of one record in the messages form, checked; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("malformed record", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        messages = from_sharegpt(record["conversations"])
    elif "prompt" in record and "completion" in record:
        messages = _as_turns(record["prompt"], "user") + _as_turns(record["completion"], "assistant")
    elif "instruction" in record and "output" in record:
        messages = [
            {"role": "user", "content": instruction_turn(record)},
            {"role": "assistant", "content": record["output"]},
        ]
    else:
        raise BadRecord(
            "unknown layout", f"fields {sorted(record)[:8]} (need messages, prompt/completion or instruction/output)"
        )
    return check_conversation(messages)


def check_conversation(messages: Any) -> list[dict[str, str]]:
    """Checked messages with at least one non-blank assistant turn; raises `BadRecord`."""
    clean = check_messages(messages)
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


def check_renders(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise `BadRecord` when the tokenizer's chat template fails on this conversation."""
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raises TemplateError, templates raise_exception with any message
        raise BadRecord("unrenderable by the chat template", str(exc).splitlines()[0][:120]) from None


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
    rows = conversations_of_rows(read_records(source, what, split, hub_config), report, tokenizer, limit)
    if not rows:
        reason = f"; {report.summary()}" if report.read else " (it is empty)"
        raise UserError(f"{what}: no usable conversation in {source}{reason}")
    report.log()
    return Dataset.from_list(rows), report


def conversations_of_rows(
    rows: Iterable[tuple[str, Any]],
    report: SkipReport,
    tokenizer: PreTrainedTokenizerBase | None = None,
    limit: int = -1,
) -> list[dict[str, Any]]:
    """{"messages"} of every (where, row) with a usable conversation (at most `limit`, -1: all); the others are
    counted in `report` by kind."""
    out = []
    for where, record in rows:
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
        out.append({"messages": messages})
        report.kept += 1
    return out


def split_conversations(data: Dataset, eval_share: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `eval_share` of the conversations (at least one when there are two or more), seeded."""
    if eval_share <= 0 or len(data) < 2:
        return data, None
    n_eval = min(len(data) - 1, max(1, round(len(data) * eval_share)))
    parts = data.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
