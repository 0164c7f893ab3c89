"""Tokenizers: train a byte-level BPE on the corpus, or adapt a pretrained one to the project's chat format.

Special tokens (pad is distinct from EOS, so padding never masks a real end of text):

- `<|endoftext|>`  EOS: ends every pretraining document and every assistant turn, so generation stops at it.
- `<|pad|>`        padding only.
- `<|system|>`, `<|user|>`, `<|assistant|>`  open a chat turn.

The chat template marks assistant turns with `{% generation %}` so that trl's assistant-only loss and
`return_assistant_tokens_mask` find them. Rendering of one exchange:

    <|user|>\nWhat is the capital of Veloria?\n<|assistant|>\nThe capital of Veloria is Marnis.<|endoftext|>\n
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.data.records import BadRecord
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ ' (valid roles: system, user, assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the project's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS.values())})
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1_000_000
    return fast


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer by local path or Hub id, with a clear error when it is not there."""
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load a tokenizer from {name_or_path}: {str(exc).splitlines()[0]} "
            "(give a directory with tokenizer files or a Hub id reachable from this machine)"
        ) from None


def prepare_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[str]:
    """Give a pretrained tokenizer what the chat stages need, keeping its own chat template; return the tokens added.

    - A tokenizer with a chat template keeps it (assistant spans are then found by `render_with_masks`, with or
      without `{% generation %}` markers). One without gets the project's template and its role tokens.
    - One without EOS gets `<|endoftext|>`.
    - A missing pad, or a pad that is an end id (Qwen's `<|endoftext|>`, Phi-3's, GPT-2's), becomes an unused special
      token the tokenizer already has (`pad_candidate`: Qwen's `<|fim_pad|>`, Llama 3.1's
      `<|finetune_right_pad_id|>`, Mistral's `[control_8]`, Phi-3's `<|placeholder1|>`); `<|pad|>` is added only when
      none fits (`generation_config`, the model's, adds its end ids to those a pad must not be). The log says which
      and why. When tokens were added the caller must resize the embeddings and train
      or save them (LoRA `modules_to_save`).
    """
    added: list[str] = []
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        added.append(EOS_TOKEN)
    if not tokenizer.chat_template:
        missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added.extend(missing)
        tokenizer.chat_template = CHAT_TEMPLATE
        logger.info("the tokenizer has no chat template: using the project's (pipeline/tokenizer.py)")
    ends = end_ids(tokenizer, generation_config)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in ends:
        why = "has none" if tokenizer.pad_token_id is None else f"its pad {tokenizer.pad_token!r} is an end id"
        candidate = pad_candidate(tokenizer, ends)
        if candidate is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            added.append(PAD_TOKEN)
            logger.info("pad token: the tokenizer %s and no unused special token fits, so %s is added", why, PAD_TOKEN)
        else:
            tokenizer.pad_token = candidate
            logger.info(
                "pad token: the tokenizer %s; using its unused special token %r (no new token)", why, candidate
            )
    return added


# Names of special tokens that a tokenizer keeps unused (padding first, then reserved slots).
_PAD_HINTS = ("pad", "reserved", "placeholder", "unused", "control")


def pad_candidate(tokenizer: PreTrainedTokenizerBase, ends: list[int]) -> str | None:
    """An existing special token fit for padding: not one of `ends`, not BOS/UNK/EOS, not in the chat template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    taken = set(ends) | {tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id}
    specials = [
        (i, t.content) for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and i not in taken
    ]
    for hint in _PAD_HINTS:
        for _, token in specials:
            if hint in token.lower() and token not in template:
                return token
    return None


# --------------------------------------------------------------------------------------------------------------
# End ids and assistant spans, read off the tokenizer's own chat template

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Probe reply"}]


def turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template puts right after an assistant turn's text (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `</s>`, `<|end|>`); None when the template ends a turn with plain text or cannot be probed."""
    if not tokenizer.chat_template:
        return None
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception:  # a template that cannot render a plain exchange is reported where it is used
        return None
    tail = text[text.rfind(_PROBE[1]["content"]) + len(_PROBE[1]["content"]) :].lstrip()
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return next((t for t in specials if tail.startswith(t)), None)


def end_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> list[int]:
    """Every id that ends a response: EOS, the template's end-of-turn token, and the generation_config's
    `eos_token_id` of `model` (a model or a GenerationConfig; an int or a list: Llama 3 ends on <|eot_id|> and <|end_of_text|>, Qwen on <|im_end|> and
    <|endoftext|>, Gemma on <eos> and <end_of_turn>). EOS first."""
    ids: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn = turn_end_token(tokenizer)
    if turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(turn))
    config = getattr(model, "generation_config", model)
    configured = getattr(config, "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys(ids))


UNRENDERABLE = "unrenderable by the chat template"


def template_refusal(exc: Exception) -> BadRecord:
    """A chat template's refusal (jinja's TemplateError, or the template's raise_exception with any message: Gemma 2
    has no system role, Mistral wants user and assistant turns to alternate) as a named skip."""
    return BadRecord(UNRENDERABLE, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """`messages` rendered by the chat template with the generation prompt; `template_refusal` when it refuses."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may raise anything
        raise template_refusal(exc) from None


def render_with_masks(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids of the conversation as the tokenizer's own template renders it, and a mask of its assistant spans.

    No `{% generation %}` markers are needed: the conversation up to each assistant turn, rendered with the generation
    prompt, must be a prefix of the whole rendering (templates that rewrite earlier turns once later ones exist fail
    here); the turn's span then runs from there through its text to the first end id after it (`end_ids`), which is
    labelled too (the model must learn to stop). An assistant turn that opens the conversation (a greeting before the
    user's first turn) is kept unlabelled, as context, where the template renders it. What a template adds inside the span (Qwen3's empty
    `<think>\n\n</think>\n\n` on the last turn) is labelled as the template renders it.

    Raises `BadRecord` (a named skip) when the template raises (Gemma 2: no system role), a prefix does not extend
    to the next one, the assistant text is not where the template should put it (Qwen3 drops `<think>` of earlier
    turns), no end id follows it, or a token straddles the span's start.
    """
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]  # an opening greeting: context
    if not trained and messages and messages[0]["role"] == "assistant":
        raise BadRecord(
            "assistant turn first", "no assistant turn follows a user turn, so there is nothing to train on"
        )
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        starts = [
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) for i in trained
        ]
    except Exception as exc:  # a template may raise anything
        raise template_refusal(exc) from None
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    ends = set(end_ids(tokenizer))
    mask = [0] * len(ids)
    turns = [messages[i] for i in trained]
    previous = 0
    for n, (prefix, turn) in enumerate(zip(starts, turns, strict=True)):
        if not full.startswith(prefix) or len(prefix) < previous:
            raise BadRecord(
                "template rewrites earlier turns",
                f"the rendering up to assistant turn {n + 1} is not a prefix of the whole conversation's",
            )
        start = len(prefix)
        limit = len(starts[n + 1]) if n + 1 < len(starts) else len(full)
        text = turn["content"].strip()
        found = full.find(text, start, limit)
        if found < 0:
            raise BadRecord(
                "template rewrites the assistant text",
                f"assistant turn {n + 1} is not rendered as written (e.g. a <think> block dropped from history)",
            )
        first = next((k for k, (a, _) in enumerate(offsets) if a >= start), len(ids))
        if first < len(ids) and first > 0 and offsets[first - 1][1] > start:
            raise BadRecord("token straddles a turn boundary", f"assistant turn {n + 1} starts inside a token")
        stop = next((k for k in range(first, len(ids)) if offsets[k][0] >= found + len(text) and ids[k] in ends), None)
        if stop is None or offsets[stop][0] >= limit:
            raise BadRecord("no end of turn", f"no end id follows assistant turn {n + 1} in the rendering")
        mask[first : stop + 1] = [1] * (stop + 1 - first)
        previous = start
    return ids, mask
