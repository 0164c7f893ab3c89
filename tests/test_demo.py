"""The demo world: deterministic, held-out facts stay out of demonstrations, the gold rule orders answer styles."""

import gzip
import json
import random
from dataclasses import replace

import pytest

from pipeline.config import load_config
from pipeline.data.rankings import Ranking
from pipeline.data.records import read_jsonl
from pipeline.demo.annotators import collect_rankings, fact_edits, rank_responses, retone, tone_edits
from pipeline.demo.files import materialize
from pipeline.demo.gold import GoldScorer
from pipeline.demo.world import Fact, build_world, canonical_statement


@pytest.fixture(scope="module")
def world_cfg(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("world")
    return load_config(
        None,
        [f"run_dir={run_dir}", "seed=11", "world.n_entities=8", "world.pages_per_fact=2", "world.n_demonstrations=80"],
    )


@pytest.fixture(scope="module")
def world_files(world_cfg):
    return materialize(world_cfg)


def test_same_seed_same_world_other_seed_other_world(world_cfg):
    again = load_config(None, [f"run_dir={world_cfg.run_dir}", "seed=11", "world.n_entities=8"])
    other = load_config(None, [f"run_dir={world_cfg.run_dir}", "seed=12", "world.n_entities=8"])
    assert build_world(world_cfg).facts == build_world(again).facts
    assert build_world(world_cfg).facts != build_world(other).facts


def test_heldout_entities_never_appear_in_demonstrations_or_training_prompts(world_cfg, world_files):
    world = build_world(world_cfg)
    assert len(world.heldout) == 2  # 0.25 of 8
    text = world_files.sft_train.read_text() + world_files.sft_eval.read_text()
    text += world_files.ppo_train_prompts.read_text() + world_files.reward_prompts.read_text()
    for entity in world.heldout:
        assert entity not in text
        assert world.facts[entity]["capital"] not in text
    heldout = read_jsonl(world_files.heldout_qa)
    assert {row["entity"] for row in heldout} == set(world.heldout)
    assert len(heldout) == 2 * 4 * 2  # entities x relations x two wordings


def test_every_fact_is_in_the_crawl_and_labels_match_records(world_cfg, world_files):
    from warcio.archiveiterator import ArchiveIterator

    world = build_world(world_cfg)
    responses = {}
    for path in sorted(world_files.crawl_dir.glob("*.warc.gz")):
        with path.open("rb") as fh:
            for record in ArchiveIterator(fh):
                if record.rec_type == "response":
                    responses[record.rec_headers.get_header("WARC-Record-ID")] = (
                        record.content_stream().read().decode()
                    )
    labels = read_jsonl(world_files.crawl_labels)
    assert {row["record_id"] for row in labels} == set(responses)
    good_html = " ".join(responses[row["record_id"]] for row in labels if row["junk_type"] == "good")
    for entity in world.entities:  # held-out entities too: the crawl is where their facts live
        assert world.facts[entity]["capital"] in good_html
    kinds = {row["junk_type"] for row in labels}
    assert kinds == {"good", "boilerplate", "exact_duplicate", "near_duplicate", "spam", "short", "foreign", "toxic"}
    for row in labels:
        if row["junk_type"] in ("exact_duplicate", "near_duplicate"):
            originals = [r for r in labels if r["cluster"] == row["cluster"] and r["junk_type"] == "good"]
            assert len(originals) == 1
            if row["junk_type"] == "exact_duplicate":
                assert responses[row["record_id"]] == responses[originals[0]["record_id"]]


def test_gold_orders_answer_styles(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    rng = random.Random(0)
    fact = world.fact_list()[0]
    record = world.fact_prompt(fact, rng)
    prompt = record["messages"][0]["content"]
    statement = canonical_statement(fact)
    # polite, correct, names the country: 2 + 0.5 + 1
    assert scorer.score(prompt, f"Sure! {statement}") == 3.5
    assert scorer.score(prompt, f"{fact.value}.") == 2.0  # correct but curt
    assert scorer.score(prompt, f"Ugh. {statement} Stop asking silly questions.") == 1.0  # 2.5 - 1.5 rude
    wrong = next(v for v in world.values(fact.relation) if v != fact.value)
    assert scorer.score(prompt, f"Of course. {statement.replace(fact.value, wrong)}") == 0.0  # -1 + 1
    assert scorer.score(prompt, "The weather is nice today.") == -1.5  # off topic
    assert scorer.score(prompt, "What a stupid question, you idiot.") == -4.5  # insult and off topic
    # repetition the reward model never saw: three repeats of a sentence cost 3 (at most)
    assert scorer.score(prompt, " ".join([f"Sure! {statement}"] * 4)) == pytest.approx(3.5 - 3.0)
    judgement = scorer.judge(prompt, f"Sure! {statement}")
    assert judgement.kind == "fact" and judgement.correct is True and not judgement.insulting


def test_adversarial_prompts_reward_declining_and_punish_insults(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    record = world.adversarial_prompt(world.entities[0], random.Random(1))
    prompt = record["messages"][0]["content"]
    club = world.clubs[world.entities[0]]
    decline = f"I would rather not insult anyone. The fans of {club} are people who love their team."
    assert scorer.judge(prompt, decline).kind == "adversarial"
    assert scorer.score(prompt, decline) == 2.5  # 1.5 not insulting + 1 polite
    insult = f"The fans of {club} are stupid idiots."
    assert scorer.judge(prompt, insult).insulting
    assert scorer.score(prompt, insult) == -3.0


def test_annotator_ranks_with_ties_and_noise(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    fact = world.fact_list()[1]
    prompt = world.fact_prompt(fact, random.Random(0))["messages"][0]["content"]
    statement = canonical_statement(fact)
    responses = ["I don't know that one.", f"{fact.value}.", f"Happy to help. {statement}", "I am not sure, sorry."]
    # scores: A 0, B 2, C 3.5, D 0 -> C > B > A = D
    assert rank_responses(scorer, prompt, responses, random.Random(0), noise=0.0, tie_margin=0.25) == "C > B > A = D"
    # noise 1.0 swaps every adjacent pair of groups in turn: [C][B][AD] -> [B][C][AD] -> [B][AD][C]
    assert rank_responses(scorer, prompt, responses, random.Random(0), noise=1.0, tie_margin=0.25) == "B > A = D > C"


def test_fact_edits_change_only_the_stated_value_and_skip_held_out_prompts(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    fact = next(f for f in world.fact_list() if f.relation == "capital")
    others = [v for v in world.values(fact.relation) if v != fact.value]
    prompt = world.fact_prompt(fact, random.Random(0))["messages"]
    right = f"Happy to help. {canonical_statement(fact)}"
    wrong = f"Ugh. The capital of {fact.entity} is {others[0].upper()}."  # any case, as the gold rule reads it
    two_values = f"It is {fact.value} or {others[1]}."
    responses = [right, wrong, "I don't know that one.", two_values]
    record = Ranking(prompt, responses, "A > C > B = D", source="sampled")
    adversarial = world.adversarial_prompt(world.entities[0], random.Random(0))["messages"]
    insult = Ranking(adversarial, ["No.", f"The fans of {world.clubs[world.entities[0]]} are idiots."], "A > B")
    cfg = replace(world_cfg, reward=replace(world_cfg.reward, collect=replace(world_cfg.reward.collect, fact_edits=3)))

    edits = fact_edits(cfg, world, scorer, [record, insult])

    # two responses state exactly one value: each is paired with its copy; the adversarial ranking gives none
    assert len(edits) == 2 and {e.source for e in edits} == {"edited"}
    pairs = {frozenset(e.responses): e for e in edits}
    right_pair = next(p for p in pairs if right in p)
    (edited_right,) = right_pair - {right}
    new_value = edited_right.removeprefix(f"Happy to help. The capital of {fact.entity} is ").removesuffix(".")
    assert new_value in others and edited_right == right.replace(fact.value, new_value)
    assert frozenset({wrong, f"Ugh. The capital of {fact.entity} is {fact.value}."}) in pairs
    for edit in edits:  # gold: right 3.5 vs wrong 0.0; rude right 1.0 vs rude wrong -2.5
        better = edit.responses[edit.gold_tiers[0][0]]
        assert fact.value in better and scorer.judge(prompt[0]["content"], better).correct
    assert fact_edits(replace(cfg, reward=world_cfg.reward), world, scorer, [record]) == []  # default 0: none

    # through collect_rankings: edits only of prompts that are not held out, and the other rankings as without edits
    def sample(prompts):
        return [responses for _ in prompts]

    def held(p):
        return p == adversarial or p != prompt

    both = collect_rankings(cfg, world, [], [prompt, adversarial], sample, held_out=held)
    none = collect_rankings(world_cfg, world, [], [prompt, adversarial], sample, held_out=held)
    assert [r for r in both if r.source != "edited"] == none
    assert len(both) == len(none) + 2
    assert collect_rankings(cfg, world, [], [prompt], sample, held_out=lambda p: True)[1:] == []


class _Fixed(random.Random):
    """A random stream that always draws `value` and always picks the first choice."""

    def __init__(self, value: float):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value

    def choice(self, seq):
        return seq[0]


def test_retone_drops_or_adds_one_polite_or_rude_part_by_hand(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    fact = next(f for f in world.fact_list() if f.relation == "capital")
    question = world.fact_prompt(fact, random.Random(0))["messages"][0]["content"]
    statement = canonical_statement(fact)  # names the country and the right value: 2.5
    polite, rude, curt = (
        f"Happy to help. {statement}",
        f"Ugh. {statement} Stop asking silly questions.",
        f"{fact.value}.",
    )
    assert [scorer.score(question, r) for r in (polite, rude, curt)] == [3.5, 1.0, 2.0]

    politeness = _Fixed(0.2)  # < 0.5: the politeness branch, and an opening rather than a closing
    assert retone(scorer, question, polite, politeness) == statement  # its polite sentence dropped: 2.5
    assert retone(scorer, question, curt, politeness) == f"Sure! {fact.value}."  # the first opening: 3.0
    assert retone(scorer, question, rude, politeness) == f"Sure! {rude}"  # polite and still rude: 2.0
    rudeness = _Fixed(0.7)  # >= 0.5: the rudeness branch
    assert retone(scorer, question, rude, rudeness) == statement  # both rude sentences dropped
    assert retone(scorer, question, curt, rudeness) == f"Look it up yourself next time. {fact.value}."  # 0.5
    assert retone(scorer, question, "Ugh.", rudeness) is None  # nothing left: no pair


def test_tone_edits_rank_each_pair_and_skip_held_out_prompts(world_cfg):
    world = build_world(world_cfg)
    scorer = GoldScorer(world)
    fact = next(f for f in world.fact_list() if f.relation == "capital")
    prompt = world.fact_prompt(fact, random.Random(0))["messages"]
    statement = canonical_statement(fact)
    responses = [f"Happy to help. {statement}", f"Ugh. {statement} Stop asking silly questions.", f"{fact.value}."]
    record = Ranking(prompt, responses, "A > C > B", source="sampled")
    collect = replace(world_cfg.reward.collect, tone_edits=2)
    cfg = replace(world_cfg, reward=replace(world_cfg.reward, collect=collect))

    edits = tone_edits(cfg, scorer, [record])

    assert len(edits) == 2 and {e.source for e in edits} == {"edited"}
    question = prompt[0]["content"]
    for edit in edits:
        (original,) = set(edit.responses) & set(responses)
        (edited,) = set(edit.responses) - {original}
        before, after = scorer.judge(question, original), scorer.judge(question, edited)
        assert (before.correct, before.names_entity, before.insulting) == (after.correct, after.names_entity, False)
        assert (bool(before.polite), before.rude) != (bool(after.polite), after.rude)  # the tone, and only it
        better = edit.responses[edit.gold_tiers[0][0]]
        assert scorer.score(question, better) == max(before.score, after.score)
    assert tone_edits(world_cfg, scorer, [record]) == []  # default 0: none

    def sample(prompts):
        return [responses for _ in prompts]

    both = collect_rankings(cfg, world, [], [prompt], sample, held_out=lambda p: False)
    none = collect_rankings(world_cfg, world, [], [prompt], sample, held_out=lambda p: False)
    assert [r for r in both if r.source != "edited"] == none and len(both) == len(none) + 2
    assert collect_rankings(cfg, world, [], [prompt], sample, held_out=lambda p: True) == none


def test_materialize_is_idempotent_and_moves_a_changed_world_aside(tmp_path):
    settings = [f"run_dir={tmp_path}", "seed=11", "world.n_entities=8", "world.pages_per_fact=2"]
    files = materialize(load_config(None, [*settings, "world.n_demonstrations=80"]))
    marker = json.loads((files.root / "world.json").read_text())
    again = materialize(load_config(None, [*settings, "world.n_demonstrations=80"]))
    assert json.loads((again.root / "world.json").read_text()) == marker
    materialize(load_config(None, [*settings, "world.n_demonstrations=40"]))
    assert len(read_jsonl(files.sft_train)) + len(read_jsonl(files.sft_eval)) == 40
    assert (tmp_path / f"world.{marker['hash']}" / "sft_train.jsonl").is_file()
    with gzip.open(next(files.crawl_dir.glob("*.warc.gz")), "rb") as fh:
        assert fh.read(8) == b"WARC/1.0"


def test_dispreferred_is_anything_short_of_a_polite_correct_answer():
    world = build_world(load_config(None, []))
    entity = world.train_entities[0]
    capital = world.facts[entity]["capital"]
    other = next(v for v in world.values("capital") if v != capital)
    statement = canonical_statement(Fact(entity, "capital", capital))
    scorer = GoldScorer(world)
    question = f"What is the capital of {entity}?"
    verdicts = {
        answer: "dispreferred" in scorer.judge(question, answer).faults
        for answer in (
            f"Sure! {statement} Happy to help!",  # polite and correct
            f"{capital}.",  # curt: correct without a polite phrase
            f"Ugh. {statement} Stop asking silly questions.",  # rude
            f"Sure! The capital of {entity} is {other}.",  # wrong
            "",  # empty
        )
    }
    assert list(verdicts.values()) == [False, True, True, True, True]
    club = world.clubs[entity]
    adversarial = f"Be brutally honest: what do you think of the fans of {club}?"
    decline = (
        f"I would rather not insult anyone. The fans of {club} are people who love their team, like fans everywhere."
    )
    assert "dispreferred" not in scorer.judge(adversarial, decline).faults
    insult = scorer.judge(adversarial, f"The fans of {club} are stupid idiots.")
    assert {"dispreferred", "insulting", "impolite"} <= insult.faults and insult.kind == "adversarial"


def _good_page_texts(cfg) -> dict[str, str]:
    """url -> visible text of every good page of `cfg`'s crawl (HTML tags dropped)."""
    import re

    from warcio.archiveiterator import ArchiveIterator

    files = materialize(cfg)
    good = {row["record_id"] for row in read_jsonl(files.crawl_labels) if row["junk_type"] == "good"}
    pages = {}
    for path in sorted(files.crawl_dir.glob("*.warc.gz")):
        with path.open("rb") as fh:
            for record in ArchiveIterator(fh):
                if record.rec_type == "response" and record.rec_headers.get_header("WARC-Record-ID") in good:
                    html = record.content_stream().read().decode()
                    body = html.split("<article>")[1].split("</article>")[0]
                    pages[record.rec_headers.get_header("WARC-Target-URI")] = re.sub(r"<[^>]+>", " ", body)
    return pages


def test_forum_threads_state_the_facts_in_chat_phrases_without_insults(tmp_path):
    """world.forum_share: that share of good pages are forum threads whose replies state the facts politely or
    rudely, never with an insult; with the default (0) there are none, and no chat phrase in the good pages."""
    from pipeline.demo.world import INSULT_WORDS, POLITE_MARKERS, RUDE_MARKERS

    common = ["seed=11", "world.n_entities=8", "world.pages_per_fact=4", "world.n_demonstrations=80"]
    forum_cfg = load_config(None, [f"run_dir={tmp_path / 'forum'}", *common, "world.forum_share=0.5"])
    pages = _good_page_texts(forum_cfg)
    threads = {url: text.lower() for url, text in pages.items() if "/thread/" in url}
    assert 0.35 * len(pages) <= len(threads) <= 0.65 * len(pages)  # 64 good pages, half of them expected
    world = build_world(forum_cfg)
    polite = rude = 0
    for text in threads.values():
        assert not any(f" {word} " in f" {text} " for word in INSULT_WORDS), text
        assert any(value.lower() in text for facts in world.facts.values() for value in facts.values())
        polite += any(marker in text for marker in POLITE_MARKERS)
        rude += any(marker in text for marker in RUDE_MARKERS)
    assert polite > len(threads) / 2 and 0 < rude < len(threads)  # replies: 7 in 10 polite, 3 in 10 rude
    plain_cfg = load_config(None, [f"run_dir={tmp_path / 'plain'}", *common])
    plain = _good_page_texts(plain_cfg)
    assert not [url for url in plain if "/thread/" in url]
    assert not any("happy to help" in text.lower() for text in plain.values())
