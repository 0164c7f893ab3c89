"""Batched sampling from a causal LM: chat prompts rendered, left-padded, sampled with the KV cache, cut at EOS.

Used by SFT evaluation, reward-data collection, chat, and PPO rollouts (which call `sample_ids` on token ids):

    from pipeline.generation import SamplingArgs, generate
    batch = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], SamplingArgs(max_new_tokens=32))
    batch.texts[0]

Every sampling setting is passed to `model.generate` explicitly, so a `generation_config.json` saved with a model
(a repetition penalty, a default top-k of 50) never changes the distribution that PPO assumes it sampled from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline.data.records import BadRecord
from pipeline.errors import UserError
from pipeline.tokenizer import end_ids, render_chat

logger = logging.getLogger(__name__)

Prompt = list[dict] | str


@dataclass
class SamplingArgs:
    """How to sample. top_k=0 and top_p=1.0 switch those filters off; do_sample=False is greedy decoding."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.do_sample and self.temperature <= 0:
            raise UserError(f"temperature must be > 0 when sampling (got {self.temperature}); use do_sample=False")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 switches it off; got {self.top_k})")


@dataclass
class GenerationBatch:
    """Prompts and sampled responses, row i from prompt i.

    `prompt_ids` are left-padded (`prompt_mask` marks real tokens); `response_ids` are right-padded with the pad id;
    `response_mask` is 1 up to and including the first EOS and 0 after it; `ended` says whether EOS was emitted.
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[str]:
    """Chat messages rendered with the chat template and the generation prompt; plain strings returned as-is."""
    rendered = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            rendered.append(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            if not tokenizer.chat_template:
                raise UserError(
                    "the tokenizer has no chat template, so chat prompts cannot be rendered; give plain strings"
                )
            try:
                rendered.append(render_chat(tokenizer, prompt))
            except BadRecord as bad:
                raise UserError(
                    f"prompt {i}: the model's chat template cannot render it ({bad.detail}); give it the turns the "
                    "template accepts"
                ) from None
        else:
            raise UserError(
                f"prompt {i} must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}"
            )
    return rendered


def renderable(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> BadRecord | None:
    """Why the chat template refuses `prompt` (a named skip), or None when it renders (plain text always does)."""
    if isinstance(prompt, str) or not tokenizer.chat_template:
        return None
    try:
        render_chat(tokenizer, prompt)
    except BadRecord as bad:
        return bad
    return None


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt. Rendered chat already holds its special tokens, so none are added to it."""
    ids = []
    for prompt, text in zip(prompts, render_prompts(tokenizer, prompts), strict=True):
        ids.append(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of sequences padded on the left to the longest one."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def mask_after_eos(response_ids: torch.Tensor, eos_id: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): mask is 1 up to and including the first end id (of any kind: `eos_id` may be several) of each
    row, 0 after it; ended marks rows with one.

    Example: ids [5, EOS, 7] -> mask [1, 1, 0], ended True; ids [5, 6, 7] -> mask [1, 1, 1], ended False.
    """
    ends = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=response_ids.device)
    is_eos = torch.isin(response_ids, ends)
    # Number of EOS strictly before each position: a token is kept while none came before it.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long(), is_eos.any(dim=1)


def _generation_config(sampling: SamplingArgs, eos_id: int | Sequence[int], pad_id: int) -> GenerationConfig:
    settings = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        eos_token_id=eos_id if isinstance(eos_id, int) else list(eos_id),
        pad_token_id=pad_id,
        num_beams=1,
        use_cache=True,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
    )
    if sampling.do_sample:
        settings.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return GenerationConfig(**settings)


def special_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> tuple[list[int], int]:
    """(end ids, pad_id): every id that ends a response (`pipeline.tokenizer.end_ids`: EOS, the template's end of
    turn, the model's generation_config list); a tokenizer without EOS cannot stop a response, so it is refused."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so responses can never end; give it one (eos_token)")
    ends = end_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    return ends, pad


def mixed_precision(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Autocast on a GPU when the model mixes bf16/fp16 weights with float32 ones (the Trainer keeps trained copies
    such as SFT's embedding rows in float32 beside a bf16 base); a no-op otherwise (CPU, or one dtype)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = dtypes & {torch.bfloat16, torch.float16}
    if next(model.parameters()).device.type != "cuda" or not half or len(dtypes) == 1:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=half.pop())


# Rows of logits reduced at once by the two functions below: bounds their float32 temporaries (exp, softmax) to
# about 16 MB whatever the vocabulary, instead of several [batch, length, vocab] tensors.
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(logits: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]]:
    flat = logits.reshape(-1, logits.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // flat.shape[-1])
    return step, flat.split(step)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens` (shape of `tokens`): the log-probs of the distribution sampled
    from (top-k / top-p filters aside). Computed as gathered logit - logsumexp, a chunk of rows at a time."""
    step, chunks = _row_chunks(logits)
    out = []
    for rows, ids in zip(chunks, tokens.reshape(-1).split(step), strict=True):
        z = rows.float() if temperature == 1.0 else rows.float() / temperature
        out.append(z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1))
    return torch.cat(out).view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) along the last axis: logsumexp(z) - sum softmax(z) * z."""
    _, chunks = _row_chunks(logits)
    out = []
    for rows in chunks:
        z = rows.float() if temperature == 1.0 else rows.float() / temperature
        lse = torch.logsumexp(z, -1)
        out.append(lse - ((z - lse.unsqueeze(-1)).exp() * z).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


@dataclass
class SampledIds:
    """Token ids sampled by `sample_ids`; with `with_logprobs`, the log-prob and entropy of each response position.

    `logprobs` and `entropy` ([prompts, response_len], 0 after the first EOS) are computed from the raw logits that
    `model.generate` sampled from (before top-k / top-p), at the sampling temperature: the same quantities a
    separate forward pass over prompt + response gives, up to float rounding (KV cache against full attention).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    states: torch.Tensor | None = None  # [prompts, response_len, hidden], float32, 0 after the first EOS


def _pad_rows(rows: list[torch.Tensor], width: int, value: float | int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


@torch.no_grad()
def sample_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingArgs,
    eos_id: int | Sequence[int],
    pad_id: int,
    batch_size: int = 16,
    with_logprobs: bool = False,
    precision: Callable[[], contextlib.AbstractContextManager] | None = None,
    with_states: bool = False,
) -> SampledIds:
    """Sample responses to tokenized prompts (see `SampledIds`).

    Prompts go through `model.generate` in chunks of `batch_size`, left-padded, with the KV cache; the chunks are
    padded to one width afterwards. Sampling uses torch's global generator (seed it for reproducible samples).
    With `with_states`, the final hidden states the LM head read at each step (the state before each response
    token, what a value head on the trunk reads) are kept too, as `SampledIds.states`.
    """
    if not prompt_ids:
        raise ValueError("sample_ids needs at least one prompt")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("an empty prompt cannot be sampled from (it has no tokens)")
    device = next(model.parameters()).device
    config = _generation_config(sampling, eos_id, pad_id)
    if with_logprobs:  # raw logits of each step (trl 1.12's PPOTrainer takes its rollout log-probs from them too)
        config.return_dict_in_generate, config.output_logits = True, True
    temperature = sampling.temperature if sampling.do_sample else 1.0
    was_training = model.training
    model.eval()
    responses: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    entropy: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    steps_seen: list[torch.Tensor] = []  # this chunk's head inputs, one [chunk, hidden] per generated token
    hook = None
    if with_states:
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda _m, args, _out: steps_seen.append(args[0][:, -1].float().cpu()))
    try:
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = left_pad(prompt_ids[start : start + batch_size], pad_id)
            with precision() if precision is not None else mixed_precision(model):
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
                )
            sequences = out.sequences if with_logprobs else out
            new = sequences[:, ids.shape[1] :]
            responses.extend(new.cpu())
            if with_states:
                states.extend(torch.stack(steps_seen[: new.shape[1]], 1))
                steps_seen.clear()
            if with_logprobs:
                steps = range(new.shape[1])  # out.logits: one [chunk, vocab] tensor per new token
                logprobs.extend(
                    torch.stack([logprobs_from_logits(out.logits[t], new[:, t], temperature) for t in steps], 1).cpu()
                )
                entropy.extend(torch.stack([entropy_from_logits(out.logits[t], temperature) for t in steps], 1).cpu())
            del out
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    all_prompts, all_masks = left_pad(prompt_ids, pad_id)
    width = max(r.shape[0] for r in responses)
    response_ids = _pad_rows(responses, width, pad_id, torch.long)
    response_mask, ended = mask_after_eos(response_ids, eos_id)
    response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
    batch = SampledIds(all_prompts, all_masks, response_ids, response_mask, ended)
    if with_logprobs:
        after_eos = response_mask == 0
        batch.logprobs = _pad_rows(logprobs, width, 0.0, torch.float32).masked_fill(after_eos, 0.0)
        batch.entropy = _pad_rows(entropy, width, 0.0, torch.float32).masked_fill(after_eos, 0.0)
    if with_states:
        padded = torch.zeros(len(states), width, states[0].shape[-1])
        for i, row in enumerate(states):
            padded[i, : row.shape[0]] = row
        batch.states = padded * response_mask.unsqueeze(-1)
    return batch


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> list[str]:
    """Response texts without special tokens (EOS, padding) or surrounding whitespace."""
    return [
        tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(response_ids, response_mask, strict=True)
    ]


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    sampling: SamplingArgs | None = None,
    batch_size: int = 16,
) -> GenerationBatch:
    """Sample one response per prompt (chat messages or plain strings); see `GenerationBatch`."""
    sampling = sampling or SamplingArgs()
    eos_id, pad_id = special_ids(tokenizer, model)
    rendered = render_prompts(tokenizer, prompts)
    ids = tokenize_prompts(tokenizer, prompts)
    b = sample_ids(model, ids, sampling, eos_id, pad_id, batch_size)
    texts = decode_responses(tokenizer, b.response_ids, b.response_mask)
    return GenerationBatch(rendered, texts, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.ended)
