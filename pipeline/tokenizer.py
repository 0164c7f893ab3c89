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

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def prepare_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a pretrained tokenizer what the chat stages need; return the tokens it added.

    A tokenizer without a chat template gets the project's (and its role tokens); one without EOS gets
    `<|endoftext|>`; a missing pad token, or a pad equal to EOS, gets a distinct `<|pad|>`. When tokens were added
    the caller must resize the embeddings and train or save them (LoRA `modules_to_save`).
    """
    added: list[str] = []
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        added.append(EOS_TOKEN)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    if not tokenizer.chat_template:
        missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added.extend(missing)
        tokenizer.chat_template = CHAT_TEMPLATE
    elif "{% generation %}" not in tokenizer.chat_template and "{%- generation %}" not in tokenizer.chat_template:
        logger.warning(
            "the tokenizer's chat template has no {%% generation %%} markers; assistant-only loss needs them, "
            "so the project's template replaces it"
        )
        missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added.extend(missing)
        tokenizer.chat_template = CHAT_TEMPLATE
    return added
