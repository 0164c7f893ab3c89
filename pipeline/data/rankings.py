"""Rankings with ties, and the four preference formats normalised into them.

The internal form (one record per prompt):

    {"prompt": [messages] or "text", "responses": ["...", "...", "...", "..."], "ranking": "C > B > A = D"}

Letters name responses in order (A = responses[0]); `>` is strictly better, `=` a tie. Optional fields: `margin`
(a float added to every strict pair's margin), `source` (e.g. "templated" or "sampled"), `gold_ranking` (the
noise-free ranking the demo evaluates against), `id`.

Formats read (`detect_format` tells them apart by their keys):

1. rankings: the internal form itself, or with label-keyed responses (`"responses": {"A": ..., "B": ..., "C": ...}`,
   the labels the ranking names; stored in label order, so labels A, B, D become A, B, C).
2. pairs: `chosen`/`rejected` as "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic/hh-rlhf), as
   conversations (lists of messages, with or without a separate `prompt`; whole conversations with a string `prompt`
   too, as HuggingFaceH4/ultrafeedback_binarized writes them), or as plain completions of a string `prompt`;
   optional `margin`. A pair is the ranking "A > B".
3. scores: a prompt (`prompt` or `instruction`; a string becomes one user message) with `completions`
   ([{"response": ..., "overall_score": ...}], openbmb/UltraFeedback) or `responses` + `scores`; equal scores tie.
4. trees: messages with `message_id`, `parent_id`, `role`, `text`, `rank` (OpenAssistant/oasst1 rows), or nested
   trees (`{"prompt": {..., "replies": [...]}}`); sibling replies that carry ranks (0 = best) become one ranking.
5. ranking tasks: the CSV written by `export_ranking_tasks` and filled in by people (`ranking` column), or any
   table with a `prompt`, response columns `A`, `B`, ... and a `ranking`. A CSV file of another format (pairs,
   rankings) is read by its columns like any other file.

Bad records (a repeated label, a label naming no response, one response, a missing field) are skipped and counted
with a summary, or stop the run with a one-line error naming the record (`on_bad="error"`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import string
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.prompts import check_prompt, conversation_to, flatten_tree, parse_transcript, prompt_key
from pipeline.data.records import BadRecord, SkipReport, read_records
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

LABELS = string.ascii_uppercase
FORMATS = ("rankings", "pairs", "scores", "trees", "tasks")
PROMPT_KEYS = ("prompt", "instruction", "question")
TEXT_KEYS = ("response", "text", "completion", "content", "output")
SCORE_KEYS = ("score", "rating", "overall_score")


# --------------------------------------------------------------------------------------------------------------
# Rankings with ties


def parse_ranking(text: str, n_responses: int, labels: str | None = None) -> list[list[int]]:
    """ "C > B > A = D" -> tiers of response indices, best first: [[2], [1], [0, 3]].

    `labels` names the responses in order (default A, B, C, ...; label-keyed responses may skip letters). Every
    response must appear exactly once. Raises `BadRecord` for a repeated label, a label that names no response, a
    response left out, or anything that is not letters joined by '>' and '='.
    """
    if text is not None and not isinstance(text, str):
        raise BadRecord("malformed ranking", f"a {type(text).__name__}; give it as text, e.g. 'C > B > A = D'")
    if text is None or not text.strip():
        raise BadRecord("not ranked", "the ranking is empty")
    if n_responses > len(LABELS):
        raise BadRecord("too many responses", f"{n_responses}; rankings name at most {len(LABELS)} (A-Z)")
    named = labels or LABELS[:n_responses]
    tiers: list[list[int]] = []
    seen: set[int] = set()
    for tier_text in text.split(">"):
        tier = []
        for token in tier_text.split("="):
            label = token.strip().upper()
            if len(label) != 1 or label not in LABELS:
                raise BadRecord(
                    "malformed ranking", f"{text!r}: {token.strip()!r} is not a response label (A, B, C, ...)"
                )
            if label not in named:
                there = f"the responses are {', '.join(named)}" if labels else f"there are {n_responses}"
                raise BadRecord("label naming no response", f"ranking {text!r}: {label} ({there})")
            index = named.index(label)
            if index in seen:
                raise BadRecord("repeated label", f"ranking {text!r} names {label} twice")
            seen.add(index)
            tier.append(index)
        tiers.append(sorted(tier))
    if len(seen) != n_responses:
        missing = ", ".join(named[i] for i in range(n_responses) if i not in seen)
        raise BadRecord(
            "response left unranked", f"ranking {text!r} leaves out {missing} (rank every response; '=' marks ties)"
        )
    return tiers


def format_ranking(tiers: Sequence[Sequence[int]]) -> str:
    """[[2], [1], [0, 3]] -> "C > B > A = D"."""
    return " > ".join(" = ".join(LABELS[i] for i in sorted(tier)) for tier in tiers)


def tier_of(tiers: Sequence[Sequence[int]]) -> list[int]:
    """The tier (0 = best) of each response: [[2], [1], [0, 3]] -> [2, 1, 0, 2]."""
    out = [0] * sum(len(t) for t in tiers)
    for level, tier in enumerate(tiers):
        for i in tier:
            out[i] = level
    return out


def strict_pairs(tiers: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Every strictly ordered pair (better, worse): C > B > A = D gives CB, CA, CD, BA, BD."""
    return [(i, j) for a, upper in enumerate(tiers) for lower in tiers[a + 1 :] for i in upper for j in lower]


def tied_pairs(tiers: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Every tied pair (i, j) with i < j: C > B > A = D gives AD."""
    return [(tier[a], tier[b]) for tier in tiers for a in range(len(tier)) for b in range(a + 1, len(tier))]


def ranking_from_scores(scores: Sequence[float]) -> str:
    """Higher score ranks higher; equal scores are ties: [1, 3, 2, 1] -> "B > C > A = D"."""
    levels = sorted(set(scores), reverse=True)
    return format_ranking([[i for i, s in enumerate(scores) if s == level] for level in levels])


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class Ranking:
    """One prompt, its K responses and their ranking with ties."""

    prompt: list[dict[str, str]] | str
    responses: list[str]
    ranking: str
    margin: float = 0.0
    source: str = ""
    gold_ranking: str = ""
    id: str = ""

    @property
    def tiers(self) -> list[list[int]]:
        return parse_ranking(self.ranking, len(self.responses))

    @property
    def gold_tiers(self) -> list[list[int]]:
        """The tiers evaluation compares against: the gold ranking when there is one."""
        return parse_ranking(self.gold_ranking or self.ranking, len(self.responses))

    def prompt_key(self) -> str:
        """A stable text form of the prompt (splits keep every ranking of one prompt together)."""
        return prompt_key(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "responses": self.responses, "ranking": self.ranking}
        for name in ("margin", "source", "gold_ranking", "id"):
            if getattr(self, name):
                row[name] = getattr(self, name)
        return row


def _responses(values: Any) -> tuple[list[str], str]:
    """(responses, their labels): a list of strings is labelled A, B, C, ...; an object keyed by labels
    ({"A": ..., "C": ...}) is taken in label order. Either needs two or more strings."""
    if isinstance(values, dict):
        # parquet stores label-keyed responses as one struct for every row: labels a row lacks come back as null
        values = {k: v for k, v in values.items() if v is not None}
        bad = [k for k in values if not (isinstance(k, str) and len(k) == 1 and k in LABELS)]
        if bad:
            raise BadRecord("malformed responses", f"response labels must be capital letters A-Z, got {bad[0]!r}")
        labels = "".join(sorted(values, key=LABELS.index))
        values = [values[label] for label in labels]
    else:
        labels = LABELS[: len(values)] if isinstance(values, list) else ""
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRecord(
            "malformed responses", "responses must be a list of strings or an object of strings keyed by label"
        )
    if len(values) < 2:
        raise BadRecord("fewer than two responses", f"{len(values)}; a ranking needs at least two")
    return values, labels


def _require(row: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise BadRecord("missing field", ", ".join(repr(k) for k in missing))


def _margin(row: dict[str, Any]) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRecord("malformed margin", f"{value!r} is not a finite number")
    return float(value)


def from_ranking_row(row: dict[str, Any]) -> Ranking:
    """Format 1: the internal form, with responses as a list or keyed by label."""
    _require(row, "prompt", "responses", "ranking")
    responses, labels = _responses(row["responses"])
    tiers = parse_ranking(row["ranking"], len(responses), labels)
    gold = row.get("gold_ranking") or ""
    if gold:
        gold = format_ranking(parse_ranking(gold, len(responses), labels))
    return Ranking(
        check_prompt(row["prompt"]),
        responses,
        format_ranking(tiers),
        _margin(row),
        str(row.get("source") or ""),
        gold,
        str(row.get("id") or ""),
    )


def _split_conversation(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise BadRecord("malformed pair", "a chosen/rejected conversation must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def from_pair_row(row: dict[str, Any]) -> Ranking:
    """Format 2: chosen/rejected transcripts, conversations, or completions of a prompt; the ranking is "A > B"."""
    _require(row, "chosen", "rejected")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None:  # explicit prompt: chosen and rejected are its completions
            prompt_c, prompt_r = prompt, prompt
            if isinstance(prompt, str) and "\n\nHuman:" in "\n\n" + prompt.lstrip("\n"):
                prompt_c = prompt_r = parse_transcript(prompt)
        elif "Assistant:" in chosen and "Assistant:" in rejected:
            prompt_c, chosen = _split_conversation(parse_transcript(chosen))
            prompt_r, rejected = _split_conversation(parse_transcript(rejected))
        else:
            raise BadRecord(
                "malformed pair", "chosen/rejected are plain strings without a 'prompt' field or an Assistant: turn"
            )
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is not None and not _whole_conversation(chosen):
            prompt_c = prompt_r = prompt
            chosen, rejected = _assistant_text(chosen), _assistant_text(rejected)
        else:  # whole conversations (HuggingFaceH4/ultrafeedback_binarized also repeats the prompt as a string)
            prompt_c, chosen = _split_conversation(chosen)
            prompt_r, rejected = _split_conversation(rejected)
    else:
        raise BadRecord("malformed pair", "chosen and rejected must both be strings or both be lists of messages")
    if prompt_c != prompt_r:
        raise BadRecord("malformed pair", "chosen and rejected continue different conversations")
    if chosen.strip() == rejected.strip():
        raise BadRecord("identical responses", "chosen and rejected are the same response")
    return Ranking(check_prompt(prompt_c), [chosen, rejected], "A > B", _margin(row), id=str(row.get("id") or ""))


def _whole_conversation(messages: list[Any]) -> bool:
    """Whether chosen/rejected messages hold the prompt's turns too (not only the assistant's reply)."""
    return any(isinstance(m, dict) and m.get("role") != "assistant" for m in messages)


def _assistant_text(messages: list[Any]) -> str:
    if not all(isinstance(m, dict) and m.get("role") == "assistant" for m in messages) or not messages:
        raise BadRecord("malformed pair", "with a separate prompt, chosen/rejected must be assistant messages only")
    return "\n".join(str(m.get("content", "")) for m in messages)


def from_scores_row(row: dict[str, Any], score_key: str | None = None) -> Ranking:
    """Format 3: responses with scores; equal scores are ties, unscored responses are left out."""
    prompt_key = next((k for k in PROMPT_KEYS if row.get(k) is not None), None)
    if prompt_key is None:
        raise BadRecord("missing field", f"'prompt' (or {', '.join(repr(k) for k in PROMPT_KEYS[1:])})")
    if row.get("completions") is not None:
        completions = row["completions"]
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise BadRecord("malformed responses", "completions must be a list of {response, score} objects")
        pairs = [(_first(c, TEXT_KEYS), _first(c, (score_key,) if score_key else SCORE_KEYS)) for c in completions]
    else:
        _require(row, "responses", "scores")
        if not isinstance(row["scores"], list) or len(row["scores"]) != len(row["responses"]):
            raise BadRecord("malformed responses", "responses and scores differ in length")
        pairs = list(zip(row["responses"], row["scores"], strict=True))
    kept = [(text, _score(value)) for text, value in pairs if isinstance(text, str) and _score(value) is not None]
    if len(kept) < 2:
        raise BadRecord("fewer than two responses", f"{len(kept)} scored; a ranking needs at least two")
    responses = [text for text, _ in kept]
    prompt = row[prompt_key]
    if isinstance(prompt, str):  # an instruction: the user's turn of a chat
        prompt = [{"role": "user", "content": prompt}]
    return Ranking(
        check_prompt(prompt),
        responses,
        ranking_from_scores([s for _, s in kept]),
        _margin(row),
        id=str(row.get("id") or ""),
    )


def _first(item: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # "N/A" and missing ratings: the response is left out
    return number if math.isfinite(number) else None


def from_tree_rows(rows: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Ranking | BadRecord]]:
    """Format 4: message trees. Yields (where, ranking or reason) for every prompter message whose replies carry
    ranks, named by the file and line of that message (rows that are not JSON objects are yielded as reasons).

    Accepts flat rows (oasst1 `message_id`/`parent_id`) or nested trees (`{"prompt": {..., "replies": [...]}}`).
    The conversation from the root to the prompter message is the prompt; ranked sibling replies are the responses
    (rank 0 is best, equal ranks are ties); unranked and deleted replies are left out.
    """
    messages: dict[str, dict[str, Any]] = {}
    where_of: dict[str, str] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            yield where, row if isinstance(row, BadRecord) else BadRecord("malformed record", "not a JSON object")
            continue
        try:
            flat = list(flatten_tree(row))
        except BadRecord as bad:
            yield where, bad
            continue
        for message in flat:
            if message.get("message_id") is None:
                yield where, BadRecord("malformed message", f"a message has no message_id ({str(message)[:60]})")
                continue
            messages[str(message["message_id"])] = message
            where_of[str(message["message_id"])] = where
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in messages.values():
        if message.get("parent_id") is not None and not message.get("deleted"):
            children[str(message["parent_id"])].append(message)
    for parent_id, replies in children.items():
        parent = messages.get(parent_id)
        if parent is None or parent.get("role") != "prompter":
            continue
        ranked = [m for m in replies if m.get("role") == "assistant" and _score(m.get("rank")) is not None]
        if not any(m.get("rank") is not None for m in replies):
            continue  # an unranked fork is not a record
        name = f"{where_of[parent_id]} (message {parent_id})"
        if len(ranked) < 2:
            yield (
                name,
                BadRecord("fewer than two responses", f"{len(ranked)} ranked replies; a ranking needs at least two"),
            )
            continue
        try:
            prompt = conversation_to(parent, messages)
        except BadRecord as exc:
            yield name, exc
            continue
        ranks = [-float(m["rank"]) for m in ranked]  # rank 0 is best: negate so that higher is better
        yield name, Ranking(prompt, [str(m.get("text", "")) for m in ranked], ranking_from_scores(ranks), id=parent_id)


# --------------------------------------------------------------------------------------------------------------
# Ranking tasks for people: export, fill in the `ranking` column, import


def export_ranking_tasks(records: Sequence[Ranking], path: Path) -> Path:
    """Write ranking tasks as CSV (one row per prompt; columns task_id, prompt, A, B, ..., ranking, prompt_messages).

    People open it in a spreadsheet or editor and type rankings like "C > B > A = D" into the empty `ranking`
    column; `read_rankings(path)` reads it back. `prompt_messages` keeps the exact chat prompt for the import.
    """
    k = max(len(r.responses) for r in records)
    if k > len(LABELS):
        raise UserError(f"a ranking task has {k} responses; tasks hold at most {len(LABELS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task_id", "prompt", *LABELS[:k], "ranking", "prompt_messages"])
        for n, record in enumerate(records):
            responses = record.responses + [""] * (k - len(record.responses))
            messages = json.dumps(record.prompt, ensure_ascii=False) if isinstance(record.prompt, list) else ""
            writer.writerow(
                [record.id or f"task-{n + 1}", render_prompt_text(record.prompt), *responses, record.ranking, messages]
            )
    tmp.replace(path)
    return path


def render_prompt_text(prompt: list[dict[str, str]] | str) -> str:
    """A chat prompt as readable text ("user: ..." lines); a string prompt as it is."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def from_task_row(row: dict[str, Any]) -> Ranking:
    """Format 5: a filled-in row of an exported ranking-task CSV."""
    _require(row, "prompt", "ranking")
    if not str(row["ranking"]).strip():
        raise BadRecord("not ranked yet", "the ranking column is empty")
    labels = [label for label in LABELS if label in row]
    responses = [row[label] for label in labels if row[label] not in (None, "")]
    prompt: Any = row["prompt"]
    if row.get("prompt_messages"):
        try:
            prompt = json.loads(row["prompt_messages"])
        except json.JSONDecodeError:
            raise BadRecord(
                "malformed task", "prompt_messages is not valid JSON (leave that column as exported)"
            ) from None
    tiers = parse_ranking(str(row["ranking"]), len(_responses(responses)[0]))
    return Ranking(check_prompt(prompt), responses, format_ranking(tiers), id=str(row.get("task_id") or ""))


# --------------------------------------------------------------------------------------------------------------
# Reading files and datasets


def detect_format(row: dict[str, Any], path: str = "") -> str:
    """Which of the formats a record is in, from its keys (ranking tasks have `task_id`, or response columns A, B)."""
    if "task_id" in row or ("A" in row and "B" in row):
        return "tasks"
    if "ranking" in row or ("responses" in row and "scores" not in row):
        return "rankings"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "completions" in row or "scores" in row:
        return "scores"
    if "message_id" in row or isinstance(row.get("prompt"), dict):
        return "trees"
    raise UserError(
        f"{path or 'dataset'}: cannot tell the format from the keys {sorted(row)} (expected prompt/responses/ranking, "
        "chosen/rejected, prompt/completions with scores, or message_id/parent_id/rank; or set reward.dataset_format)"
    )


def normalise_rows(
    rows: Iterable[tuple[str, Any]],
    fmt: str = "auto",
    on_bad: str = "skip",
    score_key: str | None = None,
    source: str = "dataset",
) -> tuple[list[Ranking], SkipReport]:
    """Turn (where, row) pairs in any format into rankings; bad records are skipped and counted, or raise.

    Raises `UserError` naming the record when `on_bad="error"`, and when no record at all could be read.
    """
    rows = list(rows)
    report = SkipReport(source=source)
    if not rows:
        raise UserError(f"{source} holds no records")
    first = next((r for _, r in rows if isinstance(r, dict)), None)
    if fmt == "auto" and first is None:  # not one readable record: say why each was dropped
        for where, row in rows:
            report.read += 1
            report.skip(where, _convert(where, row, None)[1])
        raise UserError(f"{source}: no usable records ({report.summary()})")
    if fmt == "auto":
        fmt = detect_format(first, source)
    if fmt not in FORMATS:
        raise UserError(f"dataset_format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    out: list[Ranking] = []
    if fmt == "trees":
        results: Iterable[tuple[str, Ranking | BadRecord]] = from_tree_rows(rows)
    else:
        convert = {
            "rankings": from_ranking_row,
            "pairs": from_pair_row,
            "tasks": from_task_row,
            "scores": lambda r: from_scores_row(r, score_key),
        }[fmt]
        results = (_convert(where, row, convert) for where, row in rows)
    for where, result in results:
        report.read += 1
        if isinstance(result, BadRecord):
            if on_bad == "error":
                raise UserError(
                    f"{where}: {result} (fix the record, or set reward.on_bad_record=skip to skip such records)"
                )
            report.skip(where, result)
        else:
            out.append(result)
    report.kept = len(out)
    if not out:
        raise UserError(f"{source}: no usable {fmt} records ({report.summary()})")
    report.log()
    return out, report


def _convert(where: str, row: Any, convert: Any) -> tuple[str, Ranking | BadRecord]:
    if isinstance(row, BadRecord):
        return where, row
    if not isinstance(row, dict):
        return where, BadRecord("malformed record", "not a JSON object")
    try:
        return where, convert(row)
    except BadRecord as exc:
        return where, exc


def read_rankings(
    source: str | Path,
    fmt: str = "auto",
    on_bad: str = "skip",
    split: str = "train",
    config: str | None = None,
    score_key: str | None = None,
    what: str = "reward.dataset",
) -> tuple[list[Ranking], SkipReport]:
    """Read a rankings/pairs/scores/trees/tasks file, directory or Hub dataset into rankings."""
    source = str(source)
    return normalise_rows(read_records(source, what, split, config), fmt, on_bad, score_key, source)


def write_rankings(records: Iterable[Ranking], path: Path) -> Path:
    """Write rankings as jsonl in the internal form (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
