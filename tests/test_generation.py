"""Batched generation: rendering, left padding, masking after EOS, and sampling with a tiny model."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.generation import (
    SamplingArgs,
    entropy_from_logits,
    generate,
    left_pad,
    logprobs_from_logits,
    mask_after_eos,
    render_prompts,
    sample_ids,
    tokenize_prompts,
)


def test_mask_after_eos_keeps_first_eos_and_zeroes_the_rest():
    eos = 9
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 1, 2, 3]])
    mask, ended = mask_after_eos(ids, eos)
    # row 0: tokens 5 and the EOS count, 7 and the second EOS do not; row 1: no EOS, all count; row 2: EOS first.
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(ended, torch.tensor([True, False, True]))


def test_left_pad_pads_on_the_left():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert torch.equal(ids, torch.tensor([[1, 2, 3], [0, 0, 4]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_render_prompts_uses_chat_template_and_keeps_strings(tiny_tokenizer):
    chat = [{"role": "user", "content": "What is the capital of Veloria?"}]
    rendered = render_prompts(tiny_tokenizer, [chat, "plain text"])
    assert rendered == ["<|user|>\nWhat is the capital of Veloria?\n<|assistant|>\n", "plain text"]
    with pytest.raises(UserError, match="prompt 0"):
        render_prompts(tiny_tokenizer, [{"content": "no list"}])


def test_sampling_args_refuse_bad_values():
    with pytest.raises(UserError, match="temperature"):
        SamplingArgs(temperature=0.0)
    with pytest.raises(UserError, match="top_p"):
        SamplingArgs(top_p=0.0)
    with pytest.raises(UserError, match="max_new_tokens"):
        SamplingArgs(max_new_tokens=0)


def test_generate_batches_match_single_prompts_when_greedy(tiny_model, tiny_tokenizer):
    """Left padding must not change a prompt's continuation: batched greedy == one prompt at a time."""
    prompts = [
        [{"role": "user", "content": "What is the capital of Veloria?"}],
        [{"role": "user", "content": "Hi"}],
        "The capital of",
    ]
    greedy = SamplingArgs(max_new_tokens=6, do_sample=False)
    batch = generate(tiny_model, tiny_tokenizer, prompts, greedy, batch_size=3)
    assert batch.response_ids.shape[0] == 3 and batch.response_ids.shape[1] <= 6
    for i, prompt in enumerate(prompts):
        single = generate(tiny_model, tiny_tokenizer, [prompt], greedy)
        width = single.response_ids.shape[1]
        assert torch.equal(single.response_ids[0], batch.response_ids[i, :width])
        assert single.texts[0] == batch.texts[i]
    # prompts are left-padded: the longest fills its row, the shorter ones start with pad.
    lengths = batch.prompt_mask.sum(1)
    assert batch.prompt_mask[:, -1].all() and int(lengths.max()) == batch.prompt_ids.shape[1]
    assert (batch.prompt_ids[batch.prompt_mask == 0] == tiny_tokenizer.pad_token_id).all()


def test_generate_samples_are_masked_after_eos_and_chunks_concatenate(tiny_model, tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    # Make EOS likely so some rows end early: raise its output bias through the LM head weights.
    with torch.no_grad():
        tiny_model.lm_head.weight[eos] = tiny_model.model.norm.weight.sign() * 1.0
    torch.manual_seed(0)
    prompts = ["The capital of", "Veloria exports", "Hello", "What is"] * 3
    batch = generate(tiny_model, tiny_tokenizer, prompts, SamplingArgs(max_new_tokens=8), batch_size=5)
    assert batch.response_ids.shape == batch.response_mask.shape and batch.response_ids.shape[0] == 12
    assert 0 < int(batch.ended.sum()) < 12  # with this seed 7 of 12 rows end early
    for row, mask, ended in zip(batch.response_ids, batch.response_mask, batch.ended, strict=True):
        n = int(mask.sum())
        if ended:
            assert row[n - 1] == eos and (row[: n - 1] != eos).all()
        else:
            assert n == 8 and (row != eos).all()
        assert (row[n:] == pad).all()


def test_generate_ignores_the_models_generation_config(tiny_model, tiny_tokenizer):
    """A saved repetition penalty or top-k must not change the distribution PPO assumes it sampled from."""
    sampling = SamplingArgs(max_new_tokens=8)
    torch.manual_seed(1)
    plain = generate(tiny_model, tiny_tokenizer, ["The capital of"] * 4, sampling)
    tiny_model.generation_config.repetition_penalty = 5.0
    tiny_model.generation_config.top_k = 2
    torch.manual_seed(1)
    changed = generate(tiny_model, tiny_tokenizer, ["The capital of"] * 4, sampling)
    assert torch.equal(plain.response_ids, changed.response_ids)


def test_sampled_logprobs_match_a_forward_pass_over_prompt_and_response(tiny_model, tiny_tokenizer):
    """The log-probs kept from generate's raw logits are those of a full forward pass (the recompute path)."""
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    with torch.no_grad():  # some rows end early, so the chunks differ in width and positions after EOS are masked
        tiny_model.lm_head.weight[eos] = tiny_model.model.norm.weight.sign() * 0.3
    torch.manual_seed(0)
    ids = tokenize_prompts(tiny_tokenizer, ["The capital of", "Veloria exports", "Hello", "What is"] * 2)
    sampling = SamplingArgs(max_new_tokens=8, temperature=0.7, top_k=5)  # top-k filters sampling, not the log-probs
    batch = sample_ids(tiny_model, ids, sampling, eos, pad, batch_size=3, with_logprobs=True)
    assert 0 < int(batch.ended.sum()) < 8
    full = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    with torch.no_grad():
        logits = tiny_model(input_ids=full, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    p_len = batch.prompt_ids.shape[1]
    logits = logits[:, p_len - 1 : -1]
    expected = logprobs_from_logits(logits, batch.response_ids, 0.7) * batch.response_mask
    entropy = entropy_from_logits(logits, 0.7) * batch.response_mask
    assert torch.allclose(batch.logprobs, expected, atol=1e-5)
    assert torch.allclose(batch.entropy, entropy, atol=1e-5)
    assert (batch.logprobs[batch.response_mask == 0] == 0).all() and (
        batch.logprobs[batch.response_mask == 1] < 0
    ).all()
    # the same seed samples the same tokens with or without the log-probs
    torch.manual_seed(0)
    plain = sample_ids(tiny_model, ids, sampling, eos, pad, batch_size=3)
    assert torch.equal(plain.response_ids, batch.response_ids) and plain.logprobs is None


def test_logprobs_and_entropy_by_hand_in_chunks_of_rows(monkeypatch):
    """Rows reduced one at a time (a tiny chunk budget) give the hand-computed values, and gradients flow."""
    import math

    import pipeline.generation as generation

    monkeypatch.setattr(generation, "_CHUNK_ELEMENTS", 2)  # fewer than one row of 3: one row per chunk
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0)]]], requires_grad=True)
    tokens = torch.tensor([[1, 2]])
    lp = logprobs_from_logits(logits, tokens)
    # uniform over 3: ln(1/3); softmax(0, ln 2, ln 3) = (1, 2, 3) / 6, token 2: ln(1/2)
    assert torch.allclose(lp, torch.tensor([[math.log(1 / 3), math.log(0.5)]]))
    lp.sum().backward()
    # d log p_k / d z = onehot(k) - softmax(z): row 1 (-1/3, 2/3, -1/3), row 2 (-1/6, -2/6, 1/2)
    grad = torch.tensor([[[-1 / 3, 2 / 3, -1 / 3], [-1 / 6, -2 / 6, 0.5]]])
    assert torch.allclose(logits.grad, grad, atol=1e-6)
    # entropy: ln 3; -(1/6 ln 1/6 + 2/6 ln 2/6 + 3/6 ln 3/6) = 1.0114043
    h2 = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))
    assert torch.allclose(entropy_from_logits(logits.detach()), torch.tensor([[math.log(3.0), h2]]))
    # temperature 2 on (0, ln 2, ln 3): softmax (1, sqrt 2, sqrt 3) / (1 + sqrt 2 + sqrt 3), token 2
    lp2 = logprobs_from_logits(logits.detach()[:, 1:], tokens[:, 1:], temperature=2.0)
    assert torch.allclose(lp2, torch.tensor([[math.log(math.sqrt(3) / (1 + math.sqrt(2) + math.sqrt(3)))]]))


def test_mask_after_eos_ends_at_the_first_end_id_of_any_kind():
    """Several end ids (Llama 3's <|eot_id|> and <|end_of_text|>): each row ends at whichever comes first."""
    ids = torch.tensor([[5, 9, 7, 2], [5, 6, 2, 9], [5, 6, 7, 8]])
    mask, ended = mask_after_eos(ids, [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
