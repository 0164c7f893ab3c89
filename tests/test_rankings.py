"""Rankings with ties, the four preference formats, ranking tasks for people, and bad records."""

import csv
import json

import pytest

from pipeline.data.rankings import (
    BadRecord,
    Ranking,
    export_ranking_tasks,
    format_ranking,
    from_pair_row,
    from_ranking_row,
    from_scores_row,
    normalise_rows,
    parse_ranking,
    parse_transcript,
    ranking_from_scores,
    read_rankings,
    strict_pairs,
    tied_pairs,
    tier_of,
)
from pipeline.errors import UserError

USER = [{"role": "user", "content": "What is the capital of Veloria?"}]


def test_ranking_with_ties_yields_exactly_its_five_strict_pairs():
    tiers = parse_ranking("C > B > A = D", 4)
    assert tiers == [[2], [1], [0, 3]]
    # C beats B, A, D; B beats A, D; A = D is not a strict pair
    assert sorted(strict_pairs(tiers)) == sorted([(2, 1), (2, 0), (2, 3), (1, 0), (1, 3)])
    assert tied_pairs(tiers) == [(0, 3)]
    assert tier_of(tiers) == [2, 1, 0, 2]
    assert format_ranking(tiers) == "C > B > A = D"


def test_ranking_spelling_is_normalised():
    assert format_ranking(parse_ranking(" d=a >c>  b ", 4)) == "A = D > C > B"
    assert len(strict_pairs(parse_ranking("A = B = C = D", 4))) == 0
    assert len(strict_pairs(parse_ranking("A > B > C > D", 4))) == 6  # tie-free K=4: C(4, 2) pairs


@pytest.mark.parametrize(
    "text, problem",
    [
        ("A > B > A", "repeated label: ranking .A > B > A. names A twice"),
        ("A > B > C > E", "label naming no response: ranking .A > B > C > E.: E"),
        ("A > B > C", "leaves out D"),
        ("A >> B > C > D", "is not a response label"),
        ("A, B, C, D", "is not a response label"),
        ("", "not ranked: the ranking is empty"),
    ],
)
def test_bad_ranking_is_refused_with_the_reason(text, problem):
    with pytest.raises(BadRecord, match=problem):
        parse_ranking(text, 4)


def test_equal_scores_are_ties():
    assert ranking_from_scores([1, 3, 2, 1]) == "B > C > A = D"
    assert ranking_from_scores([5.0, 5.0]) == "A = B"


# --------------------------------------------------------------------------------------------------------------
# The four formats


def test_rankings_format_is_read_as_it_is():
    row = {"prompt": USER, "responses": ["x", "y", "z"], "ranking": "b>a=c", "margin": 0.5, "source": "sampled"}
    record = from_ranking_row(row)
    assert record == Ranking(USER, ["x", "y", "z"], "B > A = C", margin=0.5, source="sampled")


def test_hh_transcript_pairs_become_a_two_response_ranking():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Capital of Veloria?\n\nAssistant: It is Marnis.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Capital of Veloria?\n\nAssistant: No idea.",
    }
    record = from_pair_row(row)
    assert record.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of Veloria?"},
    ]
    assert record.responses == ["It is Marnis.", "No idea."]
    assert record.ranking == "A > B"
    assert parse_transcript("Human: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]


def test_conversation_pairs_with_and_without_prompt_and_margin():
    answer = [{"role": "assistant", "content": "Marnis."}]
    other = [{"role": "assistant", "content": "Tol."}]
    full = from_pair_row({"chosen": USER + answer, "rejected": USER + other, "margin": 2})
    split = from_pair_row({"prompt": USER, "chosen": answer, "rejected": other})
    assert (full.prompt, full.responses, full.ranking, full.margin) == (USER, ["Marnis.", "Tol."], "A > B", 2.0)
    assert (split.prompt, split.responses, split.ranking, split.margin) == (USER, ["Marnis.", "Tol."], "A > B", 0.0)
    plain = from_pair_row({"prompt": "The capital is", "chosen": " Marnis", "rejected": " Tol"})
    assert (plain.prompt, plain.responses) == ("The capital is", [" Marnis", " Tol"])
    with pytest.raises(BadRecord, match="different conversations"):
        from_pair_row({"chosen": USER + answer, "rejected": [{"role": "user", "content": "Other?"}] + other})


def test_scored_completions_rank_by_score_with_ties_and_drop_unscored():
    ultrafeedback = {
        "instruction": "Name the capital of Veloria.",
        "completions": [
            {"model": "m1", "response": "Marnis.", "overall_score": 8.5},
            {"model": "m2", "response": "Tol.", "overall_score": 3},
            {"model": "m3", "response": "Marnis, I think.", "overall_score": 8.5},
            {"model": "m4", "response": "Unrated.", "overall_score": "N/A"},
        ],
    }
    record = from_scores_row(ultrafeedback)
    assert record.prompt == [
        {"role": "user", "content": "Name the capital of Veloria."}
    ]  # an instruction is a user turn
    assert record.responses == ["Marnis.", "Tol.", "Marnis, I think."]
    assert record.ranking == "A = C > B"
    flat = from_scores_row({"prompt": USER, "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]})
    assert flat.ranking == "B > C > A"
    with pytest.raises(BadRecord, match="fewer than two responses: 1 scored"):
        from_scores_row({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, None]})


def _oasst(message_id, parent_id, role, text, rank=None, deleted=False):
    return {
        "message_id": message_id,
        "parent_id": parent_id,
        "role": role,
        "text": text,
        "rank": rank,
        "deleted": deleted,
        "lang": "en",
        "message_tree_id": "t1",
    }


def test_message_tree_siblings_with_ranks_become_rankings():
    rows = [
        _oasst("p1", None, "prompter", "Capital of Veloria?"),
        _oasst("a1", "p1", "assistant", "Marnis.", rank=1),
        _oasst("a2", "p1", "assistant", "It is Marnis, on the river Tol.", rank=0),
        _oasst("a3", "p1", "assistant", "Tol.", rank=2),
        _oasst("a4", "p1", "assistant", "Unranked reply."),
        _oasst("a5", "p1", "assistant", "Deleted reply.", rank=1, deleted=True),
        _oasst("p2", "a2", "prompter", "And its language?"),
        _oasst("b1", "p2", "assistant", "Velorian.", rank=0),
        _oasst("b2", "p2", "assistant", "Velorian!", rank=0),
        _oasst("p3", "b1", "prompter", "Thanks"),
        _oasst("c1", "p3", "assistant", "You're welcome."),  # a single unranked reply: not a record, not an error
    ]
    records, summary = normalise_rows([(f"row {i}", r) for i, r in enumerate(rows)])
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["p1", "p2"] and summary.n_skipped == 0
    assert by_id["p1"].prompt == [{"role": "user", "content": "Capital of Veloria?"}]
    assert by_id["p1"].responses == ["Marnis.", "It is Marnis, on the river Tol.", "Tol."]
    assert by_id["p1"].ranking == "B > A > C"
    assert by_id["p2"].prompt == [
        {"role": "user", "content": "Capital of Veloria?"},
        {"role": "assistant", "content": "It is Marnis, on the river Tol."},
        {"role": "user", "content": "And its language?"},
    ]
    assert by_id["p2"].ranking == "A = B"  # equal ranks are ties
    nested = {
        "message_tree_id": "t1",
        "prompt": {
            "message_id": "p1",
            "role": "prompter",
            "text": "Capital of Veloria?",
            "replies": [
                {"message_id": "a1", "role": "assistant", "text": "Marnis.", "rank": 0, "replies": []},
                {"message_id": "a2", "role": "assistant", "text": "Tol.", "rank": 1, "replies": []},
            ],
        },
    }
    (tree,), _ = normalise_rows([("tree 0", nested)])
    assert tree.prompt == [{"role": "user", "content": "Capital of Veloria?"}]
    assert (tree.responses, tree.ranking) == (["Marnis.", "Tol."], "A > B")


def test_format_is_detected_from_the_keys(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps(
            {
                "chosen": USER + [{"role": "assistant", "content": "a"}],
                "rejected": USER + [{"role": "assistant", "content": "b"}],
            }
        )
        + "\n"
    )
    (record,), _ = read_rankings(path)
    assert record.ranking == "A > B"
    path.write_text(json.dumps({"text": "no preference here"}) + "\n")
    with pytest.raises(UserError, match="cannot tell the format"):
        read_rankings(path)


# --------------------------------------------------------------------------------------------------------------
# Ranking tasks for people


def test_ranking_tasks_round_trip_through_the_csv(tmp_path):
    records = [
        Ranking(USER, ['Marnis, "of course".', "Tol\nwith a new line", "Ugh."], "B > A = C", id="q1"),
        Ranking([{"role": "system", "content": "Be kind."}] + USER, ["x", "y"], "B > A", id="q2"),
        Ranking("A plain prompt, with a comma", ["one", "two", "three", "four"], "D > C > B > A", id="q3"),
    ]
    path = export_ranking_tasks(records, tmp_path / "tasks.csv")
    with path.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["task_id", "prompt", "A", "B", "C", "D", "ranking", "prompt_messages"]
    back, summary = read_rankings(path)
    assert back == records and summary.n_skipped == 0


def test_people_fill_in_exported_tasks_and_blank_ones_are_skipped(tmp_path):
    tasks = [Ranking(USER, ["a", "b", "c", "d"], "", id="t1"), Ranking(USER, ["e", "f", "g", "h"], "", id="t2")]
    path = export_ranking_tasks(tasks, tmp_path / "tasks.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["ranking"] = "c > b > a = d"  # what a person types; the second task is left blank
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (record,), summary = read_rankings(path)
    assert (record.id, record.responses, record.ranking) == ("t1", ["a", "b", "c", "d"], "C > B > A = D")
    assert summary.skipped == {"not ranked yet": 1}


# --------------------------------------------------------------------------------------------------------------
# Bad records


def _bad_file(tmp_path):
    good = {"prompt": USER, "responses": ["a", "b", "c", "d"], "ranking": "C > B > A = D"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "ranking": "A > B > A > C"}),
        json.dumps({**good, "ranking": "A > B > C > E"}),
        json.dumps({**good, "responses": ["only one"], "ranking": "A"}),
        json.dumps({"prompt": USER, "responses": ["a", "b"]}),
        "{not json",
        json.dumps({**good, "ranking": "B > A = C = D"}),
    ]
    path = tmp_path / "rankings.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_are_skipped_and_counted_with_a_summary(tmp_path, caplog):
    path = _bad_file(tmp_path)
    records, summary = read_rankings(path)
    assert [r.ranking for r in records] == ["C > B > A = D", "B > A = C = D"]
    assert (summary.read, summary.kept, summary.n_skipped) == (7, 2, 5)
    assert summary.skipped == {
        "repeated label": 1,
        "label naming no response": 1,
        "fewer than two responses": 1,
        "missing field": 1,
        "invalid JSON": 1,
    }
    assert summary.first["repeated label"].startswith(f"{path}:2: ")
    assert summary.first["missing field"] == f"{path}:5: missing field: 'ranking'"
    assert summary.first["invalid JSON"].startswith(f"{path}:6: invalid JSON: ")
    assert "kept 2 of 7 records, skipped 5" in caplog.text


def test_bad_record_stops_with_one_line_naming_it_when_asked(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(UserError) as info:
        read_rankings(path, on_bad="error")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:2: repeated label: ranking 'A > B > A > C' names A twice")
    assert "reward.on_bad_record=skip" in message


def test_a_file_without_any_usable_record_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": "A > A"}) + "\n")
    with pytest.raises(UserError, match="no usable rankings records.*repeated label.*names A twice"):
        read_rankings(path)
    with pytest.raises(UserError, match="reward.dataset: file not found"):
        read_rankings(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------------------
# Label-keyed responses: {"A": ..., "B": ...} under the list form's validation

KEYED = {"prompt": USER, "responses": {"A": "a", "B": "b", "C": "c", "D": "d"}, "ranking": "C > B > A = D"}


def test_label_keyed_responses_read_like_the_list_form():
    keyed = from_ranking_row(KEYED)
    assert keyed == from_ranking_row({**KEYED, "responses": ["a", "b", "c", "d"]})
    assert keyed.responses == ["a", "b", "c", "d"] and keyed.ranking == "C > B > A = D"
    # written in any key order, read in label order
    shuffled = from_ranking_row({**KEYED, "responses": {"D": "d", "B": "b", "A": "a", "C": "c"}})
    assert shuffled.responses == ["a", "b", "c", "d"] and shuffled.ranking == "C > B > A = D"
    # labels need not be consecutive: A, B, D are stored as A, B, C (the internal form names responses by position)
    gapped = from_ranking_row({"prompt": "p", "responses": {"A": "a", "B": "b", "D": "d"}, "ranking": "D > A = B"})
    assert gapped.responses == ["a", "b", "d"] and gapped.ranking == "C > A = B"
    assert sorted(strict_pairs(gapped.tiers)) == [(2, 0), (2, 1)] and tied_pairs(gapped.tiers) == [(0, 1)]


@pytest.mark.parametrize(
    "responses, ranking, problem",
    [
        ({"A": "a", "B": "b", "C": "c", "D": "d"}, "C > B > A = C", "repeated label: ranking 'C > B > A = C' names C"),
        (
            {"A": "a", "B": "b", "C": "c", "D": "d"},
            "C > B > A = E",
            "label naming no response: .*E .the responses are",
        ),
        ({"A": "a", "B": "b", "D": "d"}, "C > B > A = D", "label naming no response: .*C .the responses are A, B, D"),
        ({"A": "a", "B": "b", "C": "c", "D": "d"}, "C > B > A", "response left unranked: .*leaves out D"),
        ({"A": "a"}, "A", "fewer than two responses: 1"),
        ({"A": "a", "b": "b"}, "A > b", "malformed responses: response labels must be capital letters A-Z, got 'b'"),
        ({"A": "a", "B": 2}, "A > B", "malformed responses: responses must be a list of strings or an object"),
    ],
)
def test_bad_label_keyed_record_is_refused_whole(responses, ranking, problem):
    with pytest.raises(BadRecord, match=problem):
        from_ranking_row({"prompt": USER, "responses": responses, "ranking": ranking})


def test_label_keyed_file_skips_each_bad_record_with_one_line_and_keeps_none_of_it(tmp_path):
    lines = [
        json.dumps(KEYED),
        json.dumps({**KEYED, "ranking": "C > B > A = A"}),
        json.dumps({**KEYED, "ranking": "C > B > A = E"}),
        json.dumps({**KEYED, "ranking": "C > B > A"}),
        json.dumps({**KEYED, "responses": {"A": "only one"}, "ranking": "A"}),
        '{"prompt": "p", "responses": {"A": "x", "A": "y", "B": "z"}, "ranking": "A > B"}',  # a repeated key
        json.dumps({**KEYED, "ranking": "A = B > C = D"}),
    ]
    path = tmp_path / "keyed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = read_rankings(path)
    assert [r.ranking for r in records] == ["C > B > A = D", "A = B > C = D"]
    assert [r.responses for r in records] == [["a", "b", "c", "d"]] * 2
    assert report.skipped == {
        "repeated label": 1,
        "label naming no response": 1,
        "response left unranked": 1,
        "fewer than two responses": 1,
        "repeated key": 1,
    }
    assert report.named == [
        f"{path}:2: repeated label: ranking 'C > B > A = A' names A twice",
        f"{path}:3: label naming no response: ranking 'C > B > A = E': E (the responses are A, B, C, D)",
        f"{path}:4: response left unranked: ranking 'C > B > A' leaves out D (rank every response; '=' marks ties)",
        f"{path}:5: fewer than two responses: 1; a ranking needs at least two",
        f"{path}:6: repeated key: 'A' appears twice in one object (JSON would keep only the last)",
    ]
    assert sum(len(strict_pairs(r.tiers)) for r in records) == 5 + 4  # C>B>A=D: 5; A=B>C=D: 4
    assert sum(len(tied_pairs(r.tiers)) for r in records) == 1 + 2


def test_binarized_pairs_with_a_string_prompt_and_whole_conversations():
    """HuggingFaceH4/ultrafeedback_binarized: `prompt` as a string, `chosen`/`rejected` as whole conversations."""
    row = {
        "prompt": "Capital of Veloria?",
        "prompt_id": "p1",
        "chosen": [*USER, {"role": "assistant", "content": "Marnis."}],
        "rejected": [*USER, {"role": "assistant", "content": "No idea."}],
        "messages": [*USER, {"role": "assistant", "content": "Marnis."}],
        "score_chosen": 8.0,
        "score_rejected": 5.0,
    }
    assert from_pair_row(row) == Ranking(USER, ["Marnis.", "No idea."], "A > B")
    other = {
        **row,
        "rejected": [{"role": "user", "content": "Something else?"}, {"role": "assistant", "content": "x"}],
    }
    with pytest.raises(BadRecord, match="malformed pair: chosen and rejected continue different conversations"):
        from_pair_row(other)
