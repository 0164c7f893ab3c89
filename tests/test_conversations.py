"""Instruction data: every layout becomes the same messages form; bad records are skipped, counted and named."""

import json

import pytest

from pipeline.data.conversations import BadRecord, load_conversations, split_conversations, to_messages
from pipeline.errors import UserError

QA = [
    {"role": "user", "content": "What is the capital of Veloria?"},
    {"role": "assistant", "content": "The capital of Veloria is Marnis."},
]


def _write_jsonl(path, rows):
    with path.open("w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def test_every_layout_becomes_messages():
    assert to_messages({"messages": QA, "quality": "good"}) == QA
    assert to_messages({"prompt": QA[0]["content"], "completion": QA[1]["content"]}) == QA
    assert to_messages({"prompt": QA[:1], "completion": QA[1:]}) == QA
    assert to_messages({"instruction": QA[0]["content"], "input": "", "output": QA[1]["content"]}) == QA
    alpaca = to_messages({"instruction": "Translate.", "input": "Marnis", "output": "Marnis."})
    assert alpaca == [{"role": "user", "content": "Translate.\n\nMarnis"}, {"role": "assistant", "content": "Marnis."}]
    sharegpt = {
        "conversations": [{"from": "human", "value": QA[0]["content"]}, {"from": "gpt", "value": QA[1]["content"]}]
    }
    assert to_messages(sharegpt) == QA
    # extra keys of a message (name, tool ids) are dropped so every row has one schema
    assert to_messages({"messages": [{**QA[0], "name": "x"}, QA[1]]}) == QA


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"messages": [QA[0]]}, "no assistant turn"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"role": "wizard", "content": "hi"}, QA[1]]}, "unknown role"),
        ({"messages": [QA[0], {"role": "assistant", "content": "  "}]}, "blank assistant turns"),
        ({"messages": [{"role": "user"}, QA[1]]}, "malformed message"),
        ({"text": "just text"}, "unknown layout"),
    ],
)
def test_bad_record_is_named_by_kind(record, kind):
    with pytest.raises(BadRecord) as info:
        to_messages(record)
    assert info.value.kind == kind


def test_bad_records_are_skipped_counted_and_named(tmp_path, tiny_tokenizer, caplog):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"messages": QA},
            {"messages": [QA[0]]},  # line 2: no assistant turn
            {"messages": []},  # line 3: empty
            {"messages": [{"role": "narrator", "content": "42"}, QA[1]]},  # line 4: unknown role
            "{not json",  # line 5
            {"prompt": "Hi", "completion": "Hello!"},
        ],
    )
    data, report = load_conversations(path, tiny_tokenizer)
    assert data["messages"] == [QA, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    assert {k: v for k, v in report.as_dict().items() if k not in ("first", "named")} == {
        "read": 6,
        "kept": 2,
        "skipped": {"no assistant turn": 1, "empty conversation": 1, "unknown role": 1, "invalid JSON": 1},
    }
    summary = report.summary()
    assert "kept 2 of 6 records, skipped 4" in summary
    assert (
        f"{path}:2: no assistant turn" in summary
        and f"{path}:4: unknown role: message 0 has role 'narrator'" in summary
    )
    assert summary in caplog.text and "\n" not in summary


def test_roles_as_datasets_spell_them_are_read_as_system_user_assistant():
    """`User`/` Assistant `/`SYSTEM` in messages and ShareGPT's `bot` or Gemma's `model` were skipped as unknown roles."""
    system = {"role": "system", "content": "Be brief."}
    spelled = [{"role": " System ", "content": "Be brief."}, {**QA[0], "role": "User"}, {**QA[1], "role": "ASSISTANT"}]
    assert to_messages({"messages": spelled}) == [system, *QA]
    for user, assistant in (("human", "gpt"), ("Human", "bot"), ("user", "model"), ("USER ", " Model")):
        sharegpt = [{"from": user, "value": QA[0]["content"]}, {"from": assistant, "value": QA[1]["content"]}]
        assert to_messages({"conversations": sharegpt}) == QA, (user, assistant)
        assert to_messages({"messages": [{**QA[0], "role": user}, {**QA[1], "role": assistant}]}) == QA
    with pytest.raises(BadRecord) as info:  # a role that is none of them is still named
        to_messages({"conversations": [{"from": "wizard", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    assert info.value.kind == "unknown role" and "'wizard'" in info.value.detail


TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "capital", "arguments": '{"country": "Veloria"}'}}


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [QA[0], {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}, QA[1]]},
        {"messages": [QA[0], {"role": "assistant", "tool_calls": [TOOL_CALL]}, QA[1]]},
        {"messages": [QA[0], {"role": "assistant", "content": "Looking.", "function_call": TOOL_CALL["function"]}]},
        {"messages": [QA[0], {"role": "tool", "tool_call_id": "c1", "content": "Marnis"}, QA[1]]},
        {"messages": [QA[0], {"role": "function", "name": "capital", "content": "Marnis"}, QA[1]]},
        {"messages": [QA[0], {"role": "ipython", "content": "Marnis"}, QA[1]]},
        {"conversations": [{"from": "human", "value": "Capital?"}, {"from": "function_call", "value": "{}"}]},
        {"conversations": [{"from": "human", "value": "Capital?"}, {"from": "observation", "value": "Marnis"}]},
    ],
)
def test_tool_use_is_its_own_skip_kind_saying_it_is_not_supported(record):
    """Tool turns were skipped as 'unknown role', an assistant's tool call as 'content is NoneType': neither told the
    user that the conversation held tool use, which is not trained on."""
    with pytest.raises(BadRecord) as info:
        to_messages(record)
    assert info.value.kind == "tool calls (not supported)"
    assert "training on tool use is not supported" in info.value.detail


def test_tool_use_is_counted_and_named_in_the_summary(tmp_path):
    tool_call = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
    path = _write_jsonl(
        tmp_path / "tools.jsonl",
        [
            {"messages": QA},
            {"messages": [QA[0], tool_call, {"role": "tool", "content": "Marnis"}, QA[1]]},
            {"messages": [{"role": "tool", "content": "Marnis"}, QA[1]]},
            {"messages": [{"role": "User", "content": "Hi"}, {"role": "Assistant", "content": "Hello!"}]},
        ],
    )
    data, report = load_conversations(path)
    assert len(data) == 2 and report.skipped == {"tool calls (not supported)": 2}
    assert (
        f"2 tool calls (not supported) (first: {path}:2: tool calls (not supported): message 1 calls a tool; "
        "training on tool use is not supported)" in report.summary()
    )


def test_chat_template_that_cannot_render_skips_those_records(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer, tmp_path / "tok"))
    tok.chat_template = (  # like templates of models without a system role
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    system = [{"role": "system", "content": "Be kind."}, *QA]
    path = _write_jsonl(tmp_path / "data.jsonl", [{"messages": QA}, {"messages": system}])
    data, report = load_conversations(path, tok)
    assert len(data) == 1 and report.skipped == {"unrenderable by the chat template": 1}
    assert f"{path}:2: unrenderable by the chat template: System role not supported" in report.summary()
    # when no record renders, the error is one line naming the first record and the reason
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": system}] * 3)
    with pytest.raises(UserError) as info:
        load_conversations(only_bad, tok)
    message = str(info.value)
    assert "\n" not in message and f"{only_bad}:1" in message and "System role not supported" in message


def _saved(tokenizer, path):
    tokenizer.save_pretrained(path)
    return path


def test_parquet_and_limit(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(5)]).to_parquet(
        tmp_path / "a.parquet"
    )
    data, report = load_conversations(tmp_path / "a.parquet", limit=3)
    assert len(data) == 3 and report.read == 3
    assert data[2]["messages"] == [{"role": "user", "content": "Say 2."}, {"role": "assistant", "content": "2."}]


def test_missing_file_and_empty_file_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"sft.dataset: file not found: .*nope.jsonl"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"no usable conversation in .*empty.jsonl \(it is empty\)"):
        load_conversations(tmp_path / "empty.jsonl")


def test_held_out_split_is_seeded_and_disjoint():
    from datasets import Dataset

    data = Dataset.from_list([{"messages": [{"role": "user", "content": str(i)}, QA[1]]} for i in range(20)])
    train, held = split_conversations(data, 0.1, seed=3)
    again, held_again = split_conversations(data, 0.1, seed=3)
    assert len(train) == 18 and len(held) == 2
    assert held["messages"] == held_again["messages"]
    questions = lambda d: {m[0]["content"] for m in d["messages"]}  # noqa: E731
    assert questions(train) | questions(held) == {str(i) for i in range(20)}
    assert not questions(train) & questions(held)
    assert split_conversations(data, 0.0, seed=3) == (data, None)
