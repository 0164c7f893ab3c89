"""Every format the stages read, through each reader that takes it (prompts for PPO and comparison collection, SFT
conversations, rankings), on fixture files with the flaws real data has (tests/format_fixtures.py). The counts below
were worked out by hand from the fixtures; benchmarks/formats_table.py writes them as a table."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from format_fixtures import count_formats, write_fixtures

from pipeline.data.conversations import load_conversations
from pipeline.data.prompts import prompts_of_rows, read_prompts
from pipeline.data.rankings import Ranking, export_ranking_tasks, read_rankings
from pipeline.data.records import SkipReport, read_hub
from pipeline.errors import UserError

# (format, reader) -> (read, kept, skipped by kind, strict pairs, tied pairs)
EXPECTED = {
    ("messages", "prompts"): (10, 3, {"invalid JSON": 1, "malformed message": 1, "empty conversation": 1, "unknown role": 1, "no user turn": 1, "empty prompt": 1, "not UTF-8": 1}, 0, 0),
    ("messages", "sft"): (10, 4, {"invalid JSON": 1, "malformed message": 1, "empty conversation": 1, "unknown role": 1, "not UTF-8": 1, "no assistant turn": 1}, 0, 0),
    ("sharegpt", "prompts"): (6, 2, {"unknown role": 1, "malformed message": 2, "no prompt": 1}, 0, 0),
    ("sharegpt", "sft"): (6, 1, {"no assistant turn": 1, "unknown role": 1, "malformed message": 2, "unknown layout": 1}, 0, 0),
    ("hh", "prompts"): (7, 4, {"malformed transcript": 1, "empty prompt": 1, "invalid JSON": 1}, 0, 0),
    ("hh", "rankings"): (7, 2, {"malformed pair": 2, "identical responses": 1, "missing field": 1, "invalid JSON": 1}, 2, 0),
    ("ultrafeedback", "prompts"): (5, 3, {"empty prompt": 1, "no prompt": 1}, 0, 0),
    ("ultrafeedback", "rankings"): (5, 2, {"empty prompt": 1, "missing field": 1, "fewer than two responses": 1}, 6, 1),
    ("alpaca", "prompts"): (4, 3, {"empty prompt": 1}, 0, 0),
    ("alpaca", "sft"): (4, 3, {"empty prompt": 1}, 0, 0),
    ("oasst_flat", "prompts"): (5, 2, {"invalid JSON": 1, "missing parent": 1, "malformed message": 1}, 0, 0),
    ("oasst_flat", "rankings"): (3, 1, {"invalid JSON": 1, "fewer than two responses": 1}, 2, 1),
    ("oasst_trees", "prompts"): (4, 2, {"malformed message": 1, "empty prompt": 1}, 0, 0),
    ("oasst_trees", "rankings"): (2, 1, {"malformed message": 1}, 1, 0),
    ("rankings", "prompts"): (9, 7, {"repeated key": 1, "empty prompt": 1}, 0, 0),
    ("rankings", "rankings"): (9, 2, {"repeated label": 1, "label naming no response": 1, "response left unranked": 1, "fewer than two responses": 1, "repeated key": 1, "empty prompt": 1, "malformed responses": 1}, 10, 2),
    ("prompt_completion", "prompts"): (5, 3, {"malformed prompt": 1, "empty prompt": 1}, 0, 0),
    ("prompt_completion", "sft"): (5, 3, {"malformed message": 1, "unknown layout": 1}, 0, 0),
    ("tasks", "prompts"): (3, 3, {}, 0, 0),
    ("tasks", "rankings"): (3, 2, {"not ranked yet": 1}, 3, 1),
    ("ultrachat_hub", "prompts"): (3, 3, {}, 0, 0),
    ("ultrachat_hub", "sft"): (3, 2, {"blank assistant turns": 1}, 0, 0),
}  # fmt: skip


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return folder, {(r["format"], r["reader"]): r for r in count_formats(folder)}


def test_every_reader_counts_every_format_as_worked_out_by_hand(counts):
    _, rows = counts
    assert set(rows) == set(EXPECTED)
    for key, (read, kept, skipped, strict, tied) in EXPECTED.items():
        row = rows[key]
        got = (row["read"], row["kept"], row["skipped"], row["strict_pairs"], row["tied_pairs"])
        assert got == (read, kept, skipped, strict, tied), key
        assert read == kept + sum(skipped.values()), key


def test_skipped_rows_are_named_by_file_and_line_the_first_five_then_counted(counts):
    folder, rows = counts
    named = rows[("messages", "prompts")]["named"]
    assert named == [
        f"{folder}/messages.jsonl:3: invalid JSON: Expecting ',' delimiter at column 59",
        f"{folder}/messages.jsonl:4: malformed message: messages must be a list, got str",
        f"{folder}/messages.jsonl:5: empty conversation",
        f"{folder}/messages.jsonl:6: unknown role: message 0 has role 'narrator' (valid roles: system, user, assistant)",
        f"{folder}/messages.jsonl:7: no user turn: the conversation has no user message to answer",
    ]  # the other two of its seven are counted (and the first of each kind kept in `first`)
    assert rows[("oasst_trees", "prompts")]["named"][1] == f"{folder}/oasst_trees.jsonl:3 (message q4): empty prompt"
    assert rows[("ultrafeedback", "rankings")]["named"][0] == f"{folder}/ultrafeedback.parquet row 2: empty prompt"
    assert rows[("ultrachat_hub", "sft")]["named"] == [
        f"{folder}/ultrachat_hub[train] row 2: blank assistant turns: every assistant turn is empty"
    ]


def user(text):
    return [{"role": "user", "content": text}]


def test_the_prompt_of_each_format(tmp_path, caplog):
    files = write_fixtures(tmp_path)
    prompts = {name: [r["prompt"] for r in read_prompts(path, "ppo.dataset")[0]] for name, path in files.items()}
    # a conversation up to its last user turn; a BOM and CRLF line ends change nothing
    assert prompts["messages"][0] == [
        *user("Capital of Veloria?"),
        {"role": "assistant", "content": "Marnis."},
        *user("And its river?"),
    ]
    assert prompts["messages"][1] == [{"role": "system", "content": "Be brief."}, *user("Name a colour.")]
    assert prompts["sharegpt"] == [user("Hi"), [{"role": "system", "content": "Terse."}, *user("2+2?")]]
    # an HH pair: everything before the last Assistant turn
    assert prompts["hh"][1] == [*user("Hi"), {"role": "assistant", "content": "Hello!"}, *user("A colour?")]
    assert prompts["ultrafeedback"] == [user("Name a prime."), user("Say hi."), user("One scored.")]
    # Alpaca: the instruction, then its input; a quoted newline inside a CSV cell is kept
    assert prompts["alpaca"] == [
        user("Translate to French.\n\ncheese"),
        user("Name a river."),
        user("Summarise, on two lines.\n\nline one\nline two"),
    ]
    # OpenAssistant: every prompter turn with the conversation above it, flat rows and nested trees alike
    assert prompts["oasst_flat"] == [
        user("Capital of Veloria?"),
        [*user("Capital of Veloria?"), {"role": "assistant", "content": "Marnis."}, *user("And its river?")],
    ]
    assert prompts["oasst_trees"] == [
        user("Pick a number."),
        [*user("Pick a number."), {"role": "assistant", "content": "42"}, *user("Why 42?")],
    ]
    assert prompts["rankings"][:2] == [user("Name a prime."), "Name a prime."]
    assert prompts["prompt_completion"] == ["The capital of Veloria is", user("Capital of Veloria?"), "Only a prompt"]
    assert prompts["tasks"] == [
        [{"role": "system", "content": "Be brief."}, *user("Name a prime.")],
        "Say hi.",
        "Pick one.",
    ]
    assert prompts["ultrachat_hub"][0] == user("Plan a trip.")  # a folder read by our reader
    assert "skipped " + str(tmp_path / "messages.jsonl:3") in caplog.text


def test_a_hub_dataset_is_read_through_datasets_and_an_unreachable_id_is_one_line(tmp_path):
    hub = write_fixtures(tmp_path)["ultrachat_hub"]
    report = SkipReport(source="hub")
    records = prompts_of_rows(read_hub(str(hub), "ppo.dataset"), report)
    assert [r["prompt"] for r in records] == [user("Plan a trip."), user("Tell a joke."), user("Blank answer.")]
    assert [r["prompt_id"] for r in records] == ["u1", "u2", "u3"]  # small fields travel with the prompt
    with pytest.raises(UserError) as info:
        read_prompts("no-such-org/no-such-dataset", "ppo.dataset")
    message = str(info.value)
    assert message.startswith("ppo.dataset: cannot load 'no-such-org/no-such-dataset' split 'train'")
    assert "\n" not in message


def test_a_ranking_task_csv_gives_its_exact_chat_prompt(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, *user("Capital of Veloria?")]
    path = export_ranking_tasks(
        [Ranking(chat, ["Marnis.", "No idea."], ""), Ranking("Plain?", ["a", "b"], "")], tmp_path / "t.csv"
    )
    records, report = read_prompts(path, "reward.collect.prompts")
    assert [r["prompt"] for r in records] == [chat, "Plain?"] and (report.read, report.kept) == (2, 2)


def test_csv_cells_holding_json_conversations_are_read_as_conversations(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps([*user("Hi"), {"role": "assistant", "content": "Hello"}, *user("Bye?")])
    path.write_text('messages\n"' + cell.replace('"', '""') + '"\n"[{not json"\n')
    records, report = read_prompts(path, "ppo.dataset")
    assert [r["prompt"] for r in records] == [json.loads(cell)]
    assert report.named == [f"{path}:3: malformed message: messages must be a list, got str"]
    # a text prompt that starts with a bracket stays text (jsonl and CSV alike)
    (tmp_path / "bracket.jsonl").write_text(json.dumps({"prompt": "[INST] hi"}) + "\n")
    (tmp_path / "bracket.csv").write_text('prompt\n"[1, 2] sum these"\n')
    assert read_prompts(tmp_path / "bracket.jsonl", "ppo.dataset")[0] == [{"prompt": "[INST] hi"}]
    assert read_prompts(tmp_path / "bracket.csv", "ppo.dataset")[0] == [{"prompt": "[1, 2] sum these"}]


def test_a_file_with_no_usable_prompt_says_why_in_one_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": ""}\n{"messages": []}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as info:
        read_prompts(path, "ppo.dataset")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"ppo.dataset: no usable prompt in {path}; ")
    assert "1 empty prompt" in message and "1 empty conversation" in message and "1 not UTF-8" in message


def test_a_prompt_given_as_one_message_object_is_not_taken_for_a_tree(tmp_path):
    path = tmp_path / "one_message.jsonl"
    path.write_text(json.dumps({"prompt": {"role": "user", "content": "Hi?"}, "id": "m1"}) + "\n")
    records, report = read_prompts(path, "ppo.dataset")
    assert records == [{"id": "m1", "prompt": user("Hi?")}] and (report.read, report.kept) == (1, 1)


# --------------------------------------------------------------------------------------------------------------
# What a new user's own files look like (each failed before its fix: see the comment on each test)

QA_ROWS = [
    {"messages": [*user("Capital of Veloria?"), {"role": "assistant", "content": "Marnis."}]},
    {"messages": [*user("Café?"), {"role": "assistant", "content": "Oui."}]},
]


def test_utf16_files_as_windows_tools_write_them_are_read(tmp_path):
    """PowerShell's `>` and Notepad's "Unicode" write UTF-16 with a BOM: every line was 'not UTF-8' or invalid JSON."""
    jsonl, table = tmp_path / "chats.jsonl", tmp_path / "alpaca.csv"
    jsonl.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in QA_ROWS).encode("utf-16"))
    table.write_bytes("instruction,input,output\r\nName a river.,,The Oss.\r\n".encode("utf-16"))
    data, report = load_conversations(jsonl)
    assert (report.read, report.kept) == (2, 2) and data[1]["messages"][0]["content"] == "Café?"
    data, report = load_conversations(table)
    assert data[0]["messages"] == [*user("Name a river."), {"role": "assistant", "content": "The Oss."}]


def test_a_csv_row_with_an_unquoted_comma_is_skipped_not_read_with_shifted_columns(tmp_path):
    """The row became instruction 'Translate', input ' please.', output 'cheese': a wrong demonstration, kept."""
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\nTranslate, please.,cheese,fromage\nName a river.,,The Oss.\n")
    data, report = load_conversations(path)
    assert [m["messages"][0]["content"] for m in data] == ["Name a river."]
    assert report.named == [
        f"{path}:2: malformed CSV row: 4 cells where the header has 3 (quote cells that hold commas)"
    ]


def test_preference_pairs_and_rankings_in_csv_are_read_by_their_columns(tmp_path):
    """A .csv was always taken for ranking tasks: a pairs CSV ended in 'missing field: task_id' for every row."""
    pairs, ranked = tmp_path / "pairs.csv", tmp_path / "rankings.csv"
    pairs.write_text("prompt,chosen,rejected\nCapital?,Marnis.,No idea.\nRiver?,The Oss.,Dunno.\n")
    ranked.write_text('prompt,responses,ranking\nPrime?,"[""2"", ""4"", ""3""]",A = C > B\n')
    records, report = read_rankings(pairs)
    assert [(r.prompt, r.responses, r.ranking) for r in records] == [
        ("Capital?", ["Marnis.", "No idea."], "A > B"),
        ("River?", ["The Oss.", "Dunno."], "A > B"),
    ]
    records, _ = read_rankings(ranked)
    assert (records[0].responses, records[0].ranking) == (["2", "4", "3"], "A = C > B")
    tasks = export_ranking_tasks([Ranking("Say hi.", ["hi", "go away"], "A > B")], tmp_path / "tasks.csv")
    assert read_rankings(tasks)[0][0].ranking == "A > B"  # an exported task file is still ranking tasks


def test_label_keyed_responses_in_parquet_keep_rows_with_fewer_labels(tmp_path):
    """Parquet stores {"A", "B"} and {"A", "B", "C"} as one struct: the first row came back with C = null and was
    skipped as 'malformed responses'."""
    path = tmp_path / "keyed.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "p1", "responses": {"A": "x", "B": "y"}, "ranking": "A > B"},
                {"prompt": "p2", "responses": {"A": "x", "B": "y", "C": "z"}, "ranking": "C > A = B"},
            ]
        ),
        path,
    )
    records, report = read_rankings(path)
    assert (report.read, report.kept) == (2, 2) and records[0].responses == ["x", "y"]


def test_alpaca_input_written_as_nan_is_an_empty_input(tmp_path):
    """json.dumps of a pandas row writes a missing input as NaN: the row was skipped as a malformed record."""
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "Name a river.", "input": NaN, "output": "The Oss."}\n')
    data, report = load_conversations(path)
    assert data[0]["messages"][0] == user("Name a river.")[0] and report.kept == 1
    assert read_prompts(path, "ppo.dataset")[0][0]["prompt"] == user("Name a river.")


def test_content_given_as_text_parts_is_joined_and_an_image_part_is_named(tmp_path):
    """OpenAI's content parts were skipped as 'malformed message: content is list'."""
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Veloria?"}],
    }
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}
    path = tmp_path / "parts.jsonl"
    rows = [
        {"messages": [m, {"role": "assistant", "content": [{"type": "text", "text": "Marnis."}]}]}
        for m in (parts, image)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, report = load_conversations(path)
    assert data[0]["messages"] == [*user("Capital of Veloria?"), {"role": "assistant", "content": "Marnis."}]
    assert report.named == [
        f"{path}:2: non-text content: message 0 has a 'image_url' part (only text parts can be trained on)"
    ]


def test_one_json_object_written_over_several_lines_is_one_record(tmp_path):
    """json.dump(record, indent=2) into a .json file: every line was skipped as invalid JSON."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps(QA_ROWS[0], indent=2))
    data, report = load_conversations(path)
    assert (report.read, report.kept) == (1, 1) and data[0]["messages"] == QA_ROWS[0]["messages"]


def test_a_ranking_given_as_a_list_is_named_malformed_not_empty(tmp_path):
    path = tmp_path / "list_ranking.jsonl"
    rows = [
        {"prompt": "p", "responses": ["a", "b"], "ranking": ["B", "A"]},
        {"prompt": "q", "responses": ["a", "b"], "ranking": "A > B"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, report = read_rankings(path)
    assert report.named == [f"{path}:1: malformed ranking: a list; give it as text, e.g. 'C > B > A = D'"]


def test_an_empty_dataset_path_is_one_line_not_the_working_directory(tmp_path):
    """Path("") is the working directory: sft.dataset= read every .jsonl/.csv under it (and crashed on one)."""
    with pytest.raises(UserError) as info:
        load_conversations("")
    assert str(info.value) == "sft.dataset is empty: give a .jsonl/.json/.parquet/.csv file, a directory or a Hub id"


def test_a_file_suffix_in_capitals_is_read(tmp_path):
    """TRAIN.JSONL was refused as 'not a .jsonl, .json, .parquet, .csv file'."""
    path = tmp_path / "TRAIN.JSONL"
    path.write_text(json.dumps(QA_ROWS[0]) + "\n")
    assert load_conversations(path)[1].kept == 1


def test_prompts_read_roles_as_datasets_spell_them_and_name_tool_use(tmp_path):
    """PPO's and comparison collection's prompts: `User` and ShareGPT's `bot` were unknown roles, and a conversation
    with a tool call was 'content is NoneType' (a tool result: 'unknown role')."""
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    rows = [
        {"messages": [{"role": " System", "content": "Be brief."}, {"role": "User", "content": "Capital?"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}, {"from": "HUMAN", "value": "Bye?"}]},
        {"messages": [*user("Capital?"), call, {"role": "tool", "content": "Marnis"}, *user("And?")]},
    ]  # fmt: skip
    path = tmp_path / "spelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = read_prompts(path, "ppo.dataset")
    assert [r["prompt"] for r in records] == [
        [{"role": "system", "content": "Be brief."}, *user("Capital?")],
        [*user("Hi"), {"role": "assistant", "content": "Hello"}, *user("Bye?")],
    ]
    assert report.named == [
        f"{path}:3: tool calls (not supported): message 1 calls a tool; training on tool use is not supported"
    ]
