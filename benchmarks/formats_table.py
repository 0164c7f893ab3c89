"""The per-format counts table: each reader (prompts for PPO and comparison collection, SFT conversations, rankings)
on the fixture files of tests/format_fixtures.py (every format the stages read, with the flaws real data has), as
markdown. Not a timing: the counts are what tests/test_formats.py checks by hand.

    .venv/bin/python benchmarks/formats_table.py            # prints the table and writes benchmarks/results/formats.md
"""

from __future__ import annotations

import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from format_fixtures import count_formats  # noqa: E402

DESCRIBED = {
    "messages": "OpenAI `messages`, jsonl with a BOM and CRLF line ends",
    "sharegpt": "ShareGPT `conversations` (`from`/`value`), a JSON array",
    "hh": "Anthropic HH `chosen`/`rejected` transcripts, jsonl",
    "ultrafeedback": "openbmb/UltraFeedback `instruction` + scored `completions`, parquet",
    "alpaca": "Alpaca `instruction`/`input`/`output`, CSV (BOM, CRLF, a quoted newline)",
    "oasst_flat": "OpenAssistant oasst1/oasst2 message rows, jsonl",
    "oasst_trees": "OpenAssistant nested `trees` export, jsonl",
    "rankings": "rankings, responses as a list and keyed by label, jsonl",
    "prompt_completion": "`prompt`/`completion`, text and conversational (trl), jsonl",
    "tasks": "ranking tasks exported for people and filled in (one left blank), CSV",
    "ultrachat_hub": "UltraChat-style parquet folder through `datasets.load_dataset` (as a Hub id)",
}


def table(rows: list[dict]) -> str:
    lines = [
        "| format | file | reader | read | kept | skipped (by reason) | strict pairs | tied pairs |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['format']} | {row['file']} | {row['reader']} | error: {row['error']} | | | | |")
            continue
        reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(row["skipped"].items())) or "-"
        pairs = (row["strict_pairs"], row["tied_pairs"]) if row["reader"] == "rankings" else ("", "")
        lines.append(
            f"| {row['format']} | `{row['file']}` | {row['reader']} | {row['read']} | {row['kept']} | {reasons} | "
            f"{pairs[0]} | {pairs[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    logging.disable(logging.WARNING)  # the skip lines; the table holds their counts
    with tempfile.TemporaryDirectory() as folder:
        rows = count_formats(Path(folder))
    text = table(rows)
    print(text)
    formats = "\n".join(f"- `{name}`: {what}" for name, what in DESCRIBED.items())
    (REPO / "benchmarks" / "results" / "formats.md").write_text(
        f"""# Per-format counts of the readers

Command: `.venv/bin/python benchmarks/formats_table.py` ({time.strftime("%Y-%m-%d")}, Python {platform.python_version()}).
The fixtures are written by `tests/format_fixtures.py`; `tests/test_formats.py` checks every count below, worked out
by hand. Readers: `prompts` = `pipeline.data.prompts` (PPO's prompts and comparison collection), `sft` =
`pipeline.data.conversations` (SFT), `rankings` = `pipeline.data.rankings` (the reward stage; strict and tied pairs of
the kept rankings). For OpenAssistant data the prompt reader counts prompter messages (assistant messages are not
prompts) and the ranking reader counts prompter messages with ranked replies. Each skipped record is named by file and
line (the first five in the log, the first of each reason in the summary and `stage.json`).

Fixtures:
{formats}

{text}
"""
    )


if __name__ == "__main__":
    main()
