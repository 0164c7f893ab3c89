"""The project's tokenizer: special tokens (pad != EOS), the chat template, and the assistant mask trl relies on."""

from __future__ import annotations

import pytest
from conftest import TINY_CORPUS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.errors import UserError
from pipeline.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    load_tokenizer,
    prepare_chat_tokenizer,
    train_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Capital of Veloria?"},
    {"role": "assistant", "content": "Marnis."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


def test_special_tokens_are_single_ids_and_pad_is_not_eos(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == EOS_TOKEN and tiny_tokenizer.pad_token == PAD_TOKEN
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    ids = tiny_tokenizer("<|user|>\nhi<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids(ROLE_TOKENS["user"])
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "\nhi"


def test_training_is_deterministic():
    first = train_tokenizer(TINY_CORPUS, vocab_size=320)
    second = train_tokenizer(TINY_CORPUS, vocab_size=320)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_chat_template_renders_turns_exactly(tiny_tokenizer):
    assert tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|system|>\nBe kind.\n<|user|>\nCapital of Veloria?\n<|assistant|>\nMarnis.<|endoftext|>\n"
        "<|user|>\nThanks\n<|assistant|>\nYou are welcome.<|endoftext|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe kind.\n<|user|>\nCapital of Veloria?\n<|assistant|>\n"


def test_assistant_mask_covers_exactly_the_answers_and_their_eos(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    pieces = [
        ("<|system|>\nBe kind.\n<|user|>\nCapital of Veloria?\n<|assistant|>\n", 0),
        ("Marnis.<|endoftext|>", 1),
        ("\n<|user|>\nThanks\n<|assistant|>\n", 0),
        ("You are welcome.<|endoftext|>", 1),
        ("\n", 0),
    ]
    expected_ids, expected_mask = [], []
    for text, flag in pieces:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_mask += [flag] * len(ids)
    assert out["input_ids"] == expected_ids
    assert out["assistant_masks"] == expected_mask
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tiny_tokenizer.decode(answer) == "Marnis.<|endoftext|>You are welcome.<|endoftext|>"


def test_unknown_role_is_refused(tiny_tokenizer):
    with pytest.raises(Exception, match="unknown chat role tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _bare_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with no chat template, as many pretrained ones come."""
    vocab = {"[UNK]": 0, "hello": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


def test_prepare_chat_tokenizer_adds_what_is_missing():
    bare = _bare_tokenizer()
    added = prepare_chat_tokenizer(bare)
    assert added == [EOS_TOKEN, *ROLE_TOKENS.values(), PAD_TOKEN]
    assert bare.chat_template == CHAT_TEMPLATE
    assert bare.pad_token_id != bare.eos_token_id
    assert len(bare) == 3 + len(added)

    same_pad = _bare_tokenizer(eos_token="</s>", pad_token="</s>")
    assert prepare_chat_tokenizer(same_pad) == [*ROLE_TOKENS.values(), PAD_TOKEN]
    assert same_pad.eos_token == "</s>" and same_pad.pad_token == PAD_TOKEN


def test_native_template_is_kept_and_an_unused_special_token_pads(caplog):
    """A template without {% generation %} markers stays; a pad that is EOS becomes an unused special token."""
    tok = _bare_tokenizer(eos_token="</s>", pad_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<|fim_pad|>", "<|turn|>"]})
    template = "{% for m in messages %}<|turn|>{{ m['content'] }}</s>{% endfor %}"
    tok.chat_template = template
    with caplog.at_level("INFO", logger="pipeline.tokenizer"):
        assert prepare_chat_tokenizer(tok) == []
    assert tok.chat_template == template and tok.pad_token == "<|fim_pad|>" and len(tok) == 5
    assert "unused special token '<|fim_pad|>'" in caplog.text
    assert "%%" not in caplog.text
    ready = train_tokenizer(TINY_CORPUS, vocab_size=320)
    assert prepare_chat_tokenizer(ready) == []  # already has everything


def test_saved_tokenizer_round_trips(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.chat_template) == (PAD_TOKEN, EOS_TOKEN, CHAT_TEMPLATE)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tiny_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_missing_tokenizer_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path / "absent")
    assert "cannot load a tokenizer from" in str(info.value) and "\n" not in str(info.value)
