"""Fixture files in every format the stages read, each with the flaws real data has, and the counts of each reader.

`write_fixtures(folder)` writes them; `count_formats(folder)` runs the readers (prompts for PPO and comparison
collection, conversations for SFT, rankings for the reward stage) and returns one row per (format, reader).
tests/test_formats.py checks every count by hand; benchmarks/formats_table.py writes the table of an actual run.

Flaws: a byte-order mark, CRLF line ends, a line that is not JSON, a line with a Latin-1 byte, wrong types, empty
strings, missing fields, an object with a repeated key, unknown roles, a dangling OpenAssistant parent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.conversations import load_conversations
from pipeline.data.prompts import read_prompts
from pipeline.data.rankings import Ranking, export_ranking_tasks, read_rankings, strict_pairs, tied_pairs
from pipeline.data.records import SkipReport, read_hub
from pipeline.errors import UserError


def _lines(*rows: Any) -> list[str]:
    return [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]


def _write_jsonl(path: Path, lines: list[str], bom: bool = False, crlf: bool = False, latin1_line: int = 0) -> None:
    """Lines as UTF-8 jsonl; optionally a BOM, CRLF ends, and line `latin1_line` (1-based) in Latin-1."""
    raw = [line.encode("latin-1" if n == latin1_line else "utf-8") for n, line in enumerate(lines, start=1)]
    data = (b"\r\n" if crlf else b"\n").join(raw) + (b"\r\n" if crlf else b"\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


def _user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _bot(text: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def write_fixtures(folder: Path) -> dict[str, Path]:
    """Write one file per format into `folder`; returns format -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    # OpenAI chat messages, jsonl with a BOM and CRLF line ends
    files["messages"] = folder / "messages.jsonl"
    _write_jsonl(
        files["messages"],
        _lines(
            {"messages": [_user("Capital of Veloria?"), _bot("Marnis."), _user("And its river?"), _bot("The Oss.")]},
            {"messages": [{"role": "system", "content": "Be brief."}, _user("Name a colour."), _bot("Teal.")]},
            '{"messages": [{"role": "user", "content": "unterminated"}',  # not JSON
            {"messages": "Capital of Veloria?"},  # wrong type
            {"messages": []},  # empty
            {"messages": [{"role": "narrator", "content": "Once"}, _bot("Yes")]},  # unknown role
            {"messages": [_bot("Hello, how can I help?")]},  # no user turn (a prompt), nothing to answer
            {"messages": [_user(""), _bot("Nothing was asked.")]},  # empty user turn
            {"messages": [_user("Café au lait?"), _bot("Oui.")]},  # written in Latin-1 below
            {"messages": [_user("Only a question, no answer yet")]},  # a prompt; SFT has nothing to learn
        ),
        bom=True,
        crlf=True,
        latin1_line=9,
    )

    # ShareGPT conversations, a JSON array
    files["sharegpt"] = folder / "sharegpt.json"
    files["sharegpt"].write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
                {"conversations": [{"from": "system", "value": "Terse."}, {"from": "human", "value": "2+2?"}]},
                {"conversations": [{"from": "wizard", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                {"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "A number"}]},
                {"conversations": [{"from": "human"}, {"from": "gpt", "value": "?"}]},
                {"id": "no-conversation"},
            ],
            indent=1,
        )
    )

    # Anthropic HH pairs, jsonl
    hh = "\n\nHuman: {q}\n\nAssistant: {a}"
    files["hh"] = folder / "hh.jsonl"
    _write_jsonl(
        files["hh"],
        _lines(
            {
                "chosen": hh.format(q="Capital of Veloria?", a="Marnis."),
                "rejected": hh.format(q="Capital of Veloria?", a="No idea."),
            },
            {
                "chosen": hh.format(q="Hi", a="Hello!") + hh.format(q="A colour?", a="Teal."),
                "rejected": hh.format(q="Hi", a="Hello!") + hh.format(q="A colour?", a="Go away."),
            },
            {"chosen": "Marnis.", "rejected": "No idea."},  # plain text, no prompt
            {"chosen": "", "rejected": ""},  # empty strings
            {"chosen": hh.format(q="Same?", a="Yes."), "rejected": hh.format(q="Same?", a="Yes.")},  # identical
            {"chosen": hh.format(q="Rejected missing", a="...")},  # missing field
            "[1, 2",  # not JSON
        ),
    )

    # openbmb/UltraFeedback rows, parquet (instruction, completions with overall_score)
    def completion(text: str, score: Any) -> dict[str, Any]:
        return {"response": text, "overall_score": score}

    files["ultrafeedback"] = folder / "ultrafeedback.parquet"
    table = pa.Table.from_pylist(
        [
            {
                "instruction": "Name a prime.",
                "completions": [
                    completion("2", 9.0),
                    completion("4", 2.0),
                    completion("3", 9.0),
                    completion("9", 1.0),
                ],
            },
            {"instruction": "Say hi.", "completions": [completion("hi", 7.0), completion("hello", 6.5)]},
            {"instruction": "", "completions": [completion("x", 1.0), completion("y", 2.0)]},  # empty prompt
            {"instruction": None, "completions": [completion("x", 1.0), completion("y", 2.0)]},  # missing prompt
            {"instruction": "One scored.", "completions": [completion("a", 5.0), completion("b", float("nan"))]},
        ]
    )
    pq.write_table(table, files["ultrafeedback"])

    # Alpaca rows, CSV (the csv module writes CRLF line ends) with a BOM
    files["alpaca"] = folder / "alpaca.csv"
    with files["alpaca"].open("w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Translate to French.", "cheese", "fromage"])
        writer.writerow(["Name a river.", "", "The Oss."])
        writer.writerow(["", "orphan input", "an answer to nothing"])  # empty instruction
        writer.writerow(["Summarise, on two lines.", "line one\nline two", "Two lines."])  # a quoted newline

    # OpenAssistant oasst1/oasst2 flat message rows, jsonl
    def msg(mid: str, parent: str | None, role: str, text: Any, rank: int | None = None, **extra: Any) -> dict:
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, **extra}

    files["oasst_flat"] = folder / "oasst_flat.jsonl"
    _write_jsonl(
        files["oasst_flat"],
        _lines(
            msg("p1", None, "prompter", "Capital of Veloria?"),
            msg("a1", "p1", "assistant", "Marnis.", 0),
            msg("a2", "p1", "assistant", "Marnis, on the Oss.", 0),
            msg("a3", "p1", "assistant", "No idea.", 1),
            msg("p2", "a1", "prompter", "And its river?"),
            msg("a4", "p2", "assistant", "The Oss.", 0),
            msg("a5", "p2", "assistant", "Unranked reply."),
            msg("p3", "gone", "prompter", "A reply to a lost message"),  # dangling parent
            msg("p4", None, "prompter", 7),  # wrong type
            msg("p5", None, "prompter", "Deleted question", deleted=True),
            '{"message_id": ',  # not JSON
        ),
    )

    # OpenAssistant nested `trees` export, jsonl
    tree = {
        "message_tree_id": "t1",
        "prompt": {
            "message_id": "q1",
            "role": "prompter",
            "text": "Pick a number.",
            "replies": [
                {"message_id": "r1", "role": "assistant", "text": "7", "rank": 1, "replies": []},
                {
                    "message_id": "r2",
                    "role": "assistant",
                    "text": "42",
                    "rank": 0,
                    "replies": [{"message_id": "q2", "role": "prompter", "text": "Why 42?", "replies": []}],
                },
            ],
        },
    }
    files["oasst_trees"] = folder / "oasst_trees.jsonl"
    _write_jsonl(
        files["oasst_trees"],
        _lines(
            tree,
            {
                "message_tree_id": "t2",
                "prompt": {"message_id": "q3", "role": "prompter", "text": "Hi", "replies": ["not a message"]},
            },
            {"message_tree_id": "t3", "prompt": {"message_id": "q4", "role": "prompter", "text": "", "replies": []}},
        ),
    )

    # Rankings: the list form and label-keyed responses, jsonl
    keyed = {"A": "2", "B": "4", "C": "3", "D": "9"}
    files["rankings"] = folder / "rankings.jsonl"
    _write_jsonl(
        files["rankings"],
        _lines(
            {"prompt": [_user("Name a prime.")], "responses": ["2", "4", "3", "9"], "ranking": "A = C > B > D"},
            {"prompt": "Name a prime.", "responses": keyed, "ranking": "C > B > A = D"},
            {"prompt": "Name a prime.", "responses": keyed, "ranking": "C > B > A = A"},  # repeated label
            {"prompt": "Name a prime.", "responses": keyed, "ranking": "C > B > A = E"},  # unknown label
            {"prompt": "Name a prime.", "responses": keyed, "ranking": "C > B > A"},  # unranked response
            {"prompt": "Name a prime.", "responses": {"A": "2"}, "ranking": "A"},  # a single response
            '{"prompt": "p", "responses": {"A": "x", "A": "y", "B": "z"}, "ranking": "A > B"}',  # repeated key
            {"prompt": "", "responses": ["a", "b"], "ranking": "A > B"},  # empty prompt
            {"prompt": "Name a prime.", "responses": "2, 3", "ranking": "A > B"},  # wrong type
        ),
    )

    # prompt/completion rows (trl's standard and conversational forms), jsonl
    files["prompt_completion"] = folder / "prompt_completion.jsonl"
    _write_jsonl(
        files["prompt_completion"],
        _lines(
            {"prompt": "The capital of Veloria is", "completion": " Marnis."},
            {"prompt": [_user("Capital of Veloria?")], "completion": [_bot("Marnis.")]},
            {"prompt": 12, "completion": "a number"},  # wrong type
            {"prompt": "   ", "completion": "blank prompt"},  # empty string
            {"prompt": "Only a prompt"},  # missing completion: a prompt, not a demonstration
        ),
    )

    # ranking tasks exported for people (CSV), two filled in, one left blank
    tasks = [
        Ranking([{"role": "system", "content": "Be brief."}, _user("Name a prime.")], ["2", "4", "3"], "A = C > B"),
        Ranking("Say hi.", ["hi", "go away"], "A > B"),
        Ranking("Pick one.", ["x", "y"], ""),
    ]
    files["tasks"] = export_ranking_tasks(tasks, folder / "tasks.csv")

    # UltraChat-style rows (HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages), a parquet folder read
    # through datasets.load_dataset as a Hub id would be
    hub = folder / "ultrachat_hub"
    hub.mkdir(exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "prompt": "Plan a trip.",
                    "prompt_id": "u1",
                    "messages": [_user("Plan a trip."), _bot("Go to Marnis.")],
                },
                {
                    "prompt": "Tell a joke.",
                    "prompt_id": "u2",
                    "messages": [_user("Tell a joke."), _bot("Knock knock.")],
                },
                {"prompt": "Blank answer.", "prompt_id": "u3", "messages": [_user("Blank answer."), _bot("")]},
            ]
        ),
        hub / "train-00000-of-00001.parquet",
    )
    files["ultrachat_hub"] = hub
    return files


# (format, reader) pairs that run; the SFT reader only on formats with demonstrations
READERS = {
    "messages": ("prompts", "sft"),
    "sharegpt": ("prompts", "sft"),
    "hh": ("prompts", "rankings"),
    "ultrafeedback": ("prompts", "rankings"),
    "alpaca": ("prompts", "sft"),
    "oasst_flat": ("prompts", "rankings"),
    "oasst_trees": ("prompts", "rankings"),
    "rankings": ("prompts", "rankings"),
    "prompt_completion": ("prompts", "sft"),
    "tasks": ("prompts", "rankings"),
    "ultrachat_hub": ("prompts", "sft"),
}


def _read(fmt: str, reader: str, path: Path) -> tuple[SkipReport, int, int]:
    """(report, strict pairs, tied pairs) of one reader on one fixture."""
    if fmt == "ultrachat_hub":  # through datasets.load_dataset, as a Hub id is read
        from pipeline.data.conversations import conversations_of_rows
        from pipeline.data.prompts import prompts_of_rows

        report = SkipReport(source=f"load_dataset({path.name})")
        rows = read_hub(str(path), f"{reader}.dataset")
        (prompts_of_rows if reader == "prompts" else conversations_of_rows)(rows, report)
        return report, 0, 0
    if reader == "prompts":
        return read_prompts(path, "ppo.dataset")[1], 0, 0
    if reader == "sft":
        return load_conversations(path)[1], 0, 0
    records, report = read_rankings(path)
    return report, sum(len(strict_pairs(r.tiers)) for r in records), sum(len(tied_pairs(r.tiers)) for r in records)


def count_formats(folder: Path) -> list[dict[str, Any]]:
    """One row per (format, reader): file, read, kept, skipped by kind, strict and tied pairs (rankings)."""
    files = write_fixtures(folder)
    rows = []
    for fmt, readers in READERS.items():
        for reader in readers:
            try:
                report, strict, tied = _read(fmt, reader, files[fmt])
            except UserError as exc:
                rows.append({"format": fmt, "reader": reader, "file": files[fmt].name, "error": str(exc)})
                continue
            rows.append(
                {
                    "format": fmt,
                    "reader": reader,
                    "file": files[fmt].name,
                    "read": report.read,
                    "kept": report.kept,
                    "skipped": dict(report.skipped),
                    "strict_pairs": strict,
                    "tied_pairs": tied,
                    "named": list(report.named),
                }
            )
    return rows
