"""The one prompt extractor: the prompt of a row in any format the stages read, and the checks every prompt passes.

A prompt is a non-empty string (rendered as it is) or chat messages ending with a user turn (rendered with the
model's chat template). From a row:

| row                                                     | prompt                                              |
|---------------------------------------------------------|-----------------------------------------------------|
| `messages` / ShareGPT `conversations` (a conversation)  | the turns up to and including the last user turn    |
| `prompt_messages` (an exported ranking task, CSV)       | the chat prompt it holds as JSON                    |
| `prompt`: string, messages, or an HH transcript          | as given (a transcript becomes messages)            |
| `chosen` / `rejected` HH transcripts or conversations    | everything before the last assistant turn           |
| `instruction` (+ `input`): Alpaca, UltraFeedback          | one user turn: the instruction, then the input      |
| `question`                                               | one user turn                                       |
| OpenAssistant rows (`message_id`, `parent_id`, `role`, `text`), or the nested `trees` export (`{"prompt":     |
|   {"message_id", "role": "prompter", "text", "replies": [...]}}`): every prompter message with the conversation |
|   above it (`read_prompts`; assistant messages are neither kept nor skipped)                                    |

Responses (`responses` as a list or keyed by label, `completions`, `chosen`/`rejected`, `output`) are not read: a
ranking's or a pair's prompt is what PPO and comparison collection need.

SFT (its evaluation questions), the reward stage (rankings, comparison collection) and PPO take prompts from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.data.records import BadRecord, SkipReport, read_records
from pipeline.errors import UserError

Prompt = list[dict[str, str]] | str

ROLES = ("system", "user", "assistant")
# How datasets spell the three roles (looked up lower-cased, without surrounding spaces): OpenAI's names, ShareGPT's
# `from` (human, gpt), Gemma's `model`, and `bot` of chatbot exports. The one mapping for `messages` and ShareGPT.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# Turns of tool use: OpenAI's tool results (`tool`, the older `function`), Llama 3's `ipython`, and ShareGPT's tool
# layouts (`function_call`, `observation`). Their conversations are skipped as one kind of their own (`TOOL_USE`).
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
TOOL_USE = "tool calls (not supported)"
# Row fields that hold conversations or responses: not carried along with an extracted prompt.
_BULKY = (
    "messages",
    "conversations",
    "prompt",
    "chosen",
    "rejected",
    "completions",
    "responses",
    "completion",
    "output",
    "instruction",
    "input",
    "question",
    "text",
    "replies",
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`role` and `content` of each message after checking them (roles system, user, assistant, as `ROLE_NAMES` spells
    them in any case; text content, or a list of OpenAI text parts `[{"type": "text", "text": ...}]`, joined). A
    conversation with tool use is skipped as `TOOL_USE`, not as an unknown role or a message without text."""
    if messages is None or (isinstance(messages, list) and not messages):
        raise BadRecord("empty conversation")
    if not isinstance(messages, list):
        raise BadRecord("malformed message", f"messages must be a list, got {type(messages).__name__}")
    clean = []
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            check_no_tool_use(message, f"message {i}")
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord("malformed message", f"message {i} needs 'role' and 'content'")
        role, content = canonical_role(message["role"]), message["content"]
        if role is None:
            raise BadRecord(
                "unknown role", f"message {i} has role {message['role']!r} (valid roles: {', '.join(ROLES)})"
            )
        if isinstance(content, list):  # OpenAI's content parts: [{"type": "text", "text": ...}, ...]
            content = _text_of_parts(content, i)
        if not isinstance(content, str):
            raise BadRecord("malformed message", f"message {i} content is {type(content).__name__}, not text")
        clean.append({"role": role, "content": content})
    return clean


def canonical_role(role: Any) -> str | None:
    """system, user or assistant for a role as datasets spell it (`User`, ` assistant `, ShareGPT's `gpt`, Gemma's
    `model`; see `ROLE_NAMES`), or None for one that is none of them."""
    return ROLE_NAMES.get(role.strip().lower()) if isinstance(role, str) else None


def check_no_tool_use(message: dict[str, Any], which: str) -> None:
    """Raise `TOOL_USE` for a tool's turn (role `tool`, `function`, `ipython`; ShareGPT `from` too) or an assistant
    turn that calls tools (`tool_calls`, the older `function_call`; its content is often None): the training
    conversations hold text only, and keeping the text around a dropped call would teach the model to stop where it
    should call the tool."""
    role = message.get("role", message.get("from"))
    if isinstance(role, str) and role.strip().lower() in TOOL_ROLES:
        raise BadRecord(TOOL_USE, f"{which} is a {role.strip()!r} turn; training on tool use is not supported")
    if message.get("tool_calls") or message.get("function_call"):
        raise BadRecord(TOOL_USE, f"{which} calls a tool; training on tool use is not supported")


def _text_of_parts(parts: list[Any], i: int) -> str:
    """The text of a message given as content parts; a part that is not text (an image) makes the record unusable."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRecord("non-text content", f"message {i} has a {kind!r} part (only text parts can be trained on)")
        texts.append(part["text"])
    return "".join(texts)


def from_sharegpt(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT `conversations` ({"from": "human"|"gpt"|"system", "value": ...}; any name of `ROLE_NAMES`) as
    messages."""
    if not isinstance(turns, list):
        raise BadRecord("malformed message", "conversations must be a list")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict):
            check_no_tool_use(turn, f"turn {i}")
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("malformed message", f"turn {i} needs 'from' and 'value'")
        role = canonical_role(turn["from"])
        if role is None:
            raise BadRecord("unknown role", f"turn {i} is from {turn['from']!r} (valid: {', '.join(ROLE_NAMES)})")
        out.append({"role": role, "content": turn["value"]})
    return out


def parse_transcript(text: str) -> list[dict[str, str]]:
    """ "\\n\\nHuman: Hi\\n\\nAssistant: Hello" (Anthropic HH) -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise BadRecord("malformed transcript", f"does not start with 'Human:' or 'Assistant:': {parts[0][:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def is_transcript(text: str) -> bool:
    return "\n\nHuman:" in "\n\n" + text.lstrip("\n")


def check_prompt(prompt: Any) -> Prompt:
    """A prompt is a non-empty string or a non-empty list of {"role", "content"} messages ending with a user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRecord("empty prompt")
        return prompt
    if isinstance(prompt, dict) and "role" in prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRecord("malformed prompt", "a prompt is a string or a list of {role, content} messages")
    messages = check_messages(prompt)
    if messages[-1]["role"] != "user":
        raise BadRecord("malformed prompt", "the prompt's last message must be from the user")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise BadRecord("empty prompt")
    return messages


def instruction_turn(row: dict[str, Any]) -> str:
    """The user's turn of an Alpaca or UltraFeedback row: the instruction, then its `input` when there is one."""
    instruction, extra = row["instruction"], row.get("input")
    if extra is None or (isinstance(extra, float) and math.isnan(extra)):  # pandas writes a missing input as NaN
        extra = ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise BadRecord("malformed record", "instruction and input must be strings")
    if not instruction.strip():
        raise BadRecord("empty prompt", "the instruction is empty")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def up_to_last_user_turn(messages: Any) -> list[dict[str, str]]:
    """A conversation cut after its last user turn (what a model is asked to continue)."""
    messages = check_messages(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise BadRecord("no user turn", "the conversation has no user message to answer")
    return messages[: last_user + 1]


def extract_prompt(row: Any) -> Prompt:
    """The prompt of one row in any of the module's formats; raises `BadRecord` naming what is wrong."""
    if not isinstance(row, dict):
        raise BadRecord("malformed record", f"expected a JSON object, got {type(row).__name__}")
    if row.get("prompt_messages"):  # an exported ranking task: the exact chat prompt, as JSON
        try:
            return check_prompt(json.loads(row["prompt_messages"]))
        except (json.JSONDecodeError, TypeError):
            raise BadRecord(
                "malformed task", "prompt_messages is not valid JSON (leave that column as exported)"
            ) from None
    if row.get("messages") is not None:
        return check_prompt(up_to_last_user_turn(row["messages"]))
    if row.get("conversations") is not None:
        return check_prompt(up_to_last_user_turn(from_sharegpt(row["conversations"])))
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        if isinstance(prompt, str) and is_transcript(prompt):
            return check_prompt(up_to_last_user_turn(parse_transcript(prompt)))
        if isinstance(prompt, list):
            return check_prompt(up_to_last_user_turn(prompt))
        return check_prompt(prompt)
    if row.get("chosen") is not None:
        chosen = row["chosen"]
        if isinstance(chosen, str):
            if not chosen.strip():
                raise BadRecord("empty prompt", "chosen is empty")
            if not is_transcript(chosen):
                raise BadRecord(
                    "malformed transcript", "chosen is plain text without a 'prompt' field or a Human: turn"
                )
            chosen = parse_transcript(chosen)
        messages = check_messages(chosen)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return check_prompt(messages)
    if row.get("instruction") is not None:
        return check_prompt([{"role": "user", "content": instruction_turn(row)}])
    if row.get("question") is not None:
        return check_prompt([{"role": "user", "content": row["question"]}])
    raise BadRecord(
        "no prompt",
        f"fields {sorted(row)[:8]} (need messages, conversations, prompt, chosen, instruction, question, or "
        "OpenAssistant message rows or trees)",
    )


def prompt_text(prompt: Prompt) -> str:
    """The user's question of a prompt (its last user turn), as a judge reads it."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def prompt_key(prompt: Prompt) -> str:
    """A stable text form of a prompt (string or messages): splits keep every record of one prompt together."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _extras(row: dict[str, Any]) -> dict[str, Any]:
    """The small fields of a row carried along with its prompt (e.g. the demo's `kind`)."""
    return {k: v for k, v in row.items() if k not in _BULKY and isinstance(v, (str, int, float, bool, type(None)))}


def prompts_of_rows(rows: Iterable[tuple[str, Any]], report: SkipReport) -> list[dict[str, Any]]:
    """{"prompt", ...small fields} for every row with a prompt; the others are counted in `report`, by kind."""
    rows = list(rows)
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    if "message_id" in first or is_tree(first):  # OpenAssistant rows or nested trees
        return _tree_prompts(rows, report)
    records = []
    for where, row in rows:
        report.read += 1
        try:
            if isinstance(row, BadRecord):
                raise row
            records.append({**_extras(row), "prompt": extract_prompt(row)})
            report.kept += 1
        except BadRecord as bad:
            report.skip(where, bad)
    return records


def conversation_to(message: dict[str, Any], messages: dict[str, dict[str, Any]]) -> Prompt:
    """The conversation from the root of a message tree down to `message` (an OpenAssistant prompter message)."""
    path = []
    node: dict[str, Any] | None = message
    while node is not None:
        role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role", ""))
        if role is None or not isinstance(node.get("text"), str):
            raise BadRecord(
                "malformed message", f"message {node.get('message_id')} has no prompter/assistant role or no text"
            )
        path.append({"role": role, "content": node["text"]})
        parent = node.get("parent_id")
        node = messages.get(str(parent)) if parent is not None else None
        if parent is not None and node is None:
            raise BadRecord("missing parent", f"parent {parent} of a message is missing from the data")
    return check_prompt(path[::-1])


def is_tree(row: dict[str, Any]) -> bool:
    """Whether a row is a nested OpenAssistant tree (`{"prompt": {"message_id", ..., "replies": [...]}}`), not a
    prompt given as one message (`{"prompt": {"role": "user", "content": ...}}`)."""
    root = row.get("prompt")
    return isinstance(root, dict) and ("message_id" in root or "replies" in root)


def flatten_tree(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The messages of a nested OpenAssistant tree (`{"prompt": {..., "replies": [...]}}`) as flat rows with
    `parent_id`, root first; a flat row as it is."""
    if is_tree(row):
        stack = [(row["prompt"], None)]
        while stack:
            node, parent = stack.pop()
            if not isinstance(node, dict):
                raise BadRecord("malformed message", f"a reply is {type(node).__name__}, not a message object")
            flat = {k: v for k, v in node.items() if k != "replies"}
            flat.setdefault("parent_id", parent)
            yield flat
            replies = node.get("replies") or []
            if not isinstance(replies, list):
                raise BadRecord("malformed message", "replies must be a list of messages")
            stack.extend((child, node.get("message_id")) for child in reversed(replies))
    else:
        yield row


def _tree_prompts(rows: list[tuple[str, Any]], report: SkipReport) -> list[dict[str, Any]]:
    """OpenAssistant rows or nested trees: every prompter message, with the conversation from the root down to it.
    Prompter messages and unusable rows are counted (read, kept, skipped); assistant messages are not prompts. A
    message of a nested tree is named by the tree's line and its id."""
    where_of, messages = {}, {}
    for where, row in rows:
        try:
            if isinstance(row, BadRecord):
                raise row
            if not isinstance(row, dict):
                raise BadRecord("malformed record", f"expected a JSON object, got {type(row).__name__}")
            flat = list(flatten_tree(row))
            if any(m.get("message_id") is None for m in flat):
                raise BadRecord("malformed message", "a message has no message_id")
        except BadRecord as bad:
            report.read += 1
            report.skip(where, bad)
            continue
        nested = is_tree(row)
        for message in flat:
            message_id = str(message["message_id"])
            messages[message_id] = message
            where_of[message_id] = f"{where} (message {message_id})" if nested else where
    records = []
    for message_id, row in messages.items():
        if row.get("role") != "prompter" or row.get("deleted"):
            continue
        report.read += 1
        try:
            records.append({"prompt": conversation_to(row, messages), "message_id": message_id})
            report.kept += 1
        except BadRecord as bad:
            report.skip(where_of[message_id], bad)
    return records


def read_prompts(
    source: str | Path, what: str, split: str = "train", config: str | None = None
) -> tuple[list[dict[str, Any]], SkipReport]:
    """Prompt records of a file, directory or Hub dataset, and the report of rows skipped (each kind named by its
    first file and line). No usable prompt at all is a one-line error saying why."""
    report = SkipReport(source=str(source))
    records = prompts_of_rows(read_records(source, what, split, config), report)
    if not records:
        reason = f"; {report.summary()}" if report.read else " (it is empty)"
        raise UserError(f"{what}: no usable prompt in {source}{reason}")
    report.log()
    return records, report


def split_prompts(
    records: list[dict[str, Any]], share: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out): `share` of the distinct prompts held out by a seeded hash of each prompt, so a prompt that
    occurs twice lands on one side only; both keep the records' order."""

    def rank(record: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}:{prompt_key(record['prompt'])}".encode()).hexdigest()

    keys = sorted({rank(r) for r in records})
    n_held = min(len(keys) - 1, max(1, round(len(keys) * share))) if len(keys) > 1 else 0
    held = set(keys[:n_held])
    return [r for r in records if rank(r) not in held], [r for r in records if rank(r) in held]
