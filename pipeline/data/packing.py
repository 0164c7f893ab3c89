"""Tokenize documents and pack them into fixed-length blocks for causal-LM pretraining.

Each document is tokenized and ends with EOS; the token streams are concatenated and cut into `max_seq_len` blocks
(the tail of each batch of `PACK_BATCH` documents that does not fill a block is dropped). Both steps are
`datasets.map` calls with fingerprints derived from the input's fingerprint, the tokenizer's content and the block
length, so a second run (a resume, another rank, a re-run) reads the cached Arrow files instead of redoing the work,
and any change to those inputs gives new cache files. A streamed (`IterableDataset`) corpus is packed on the fly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PACK_BATCH = 1000  # documents per packing batch; part of the cache key, so changing it re-packs
_VERSION = "1"  # bump when the packing logic changes, so old cache files are not reused


def pack_token_lists(token_lists: Iterable[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut them into full blocks of `block_size` (the short tail is dropped)."""
    stream = [token for tokens in token_lists for token in tokens]
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides how the tokenizer splits text (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    content += f"|eos={tokenizer.eos_token_id}|{tokenizer.all_special_tokens}"
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def tokenize_and_pack(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    text_key: str = "text",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Documents (column `text_key`) -> packed blocks with one column, `input_ids`, each `max_seq_len` long.

    Empty documents are skipped. The result of a `Dataset` is cached next to the input's Arrow files.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; pipeline.tokenizer.prepare_chat_tokenizer adds one")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[text_key] if text and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [tokens + [eos] for tokens in ids]}

    def pack(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": pack_token_lists(batch["input_ids"], max_seq_len)}

    columns = dataset.column_names
    if isinstance(dataset, IterableDataset):
        tokens = dataset.map(tokenize, batched=True, remove_columns=columns)
        return tokens.map(pack, batched=True, batch_size=PACK_BATCH)

    key = (dataset._fingerprint, tokenizer_digest(tokenizer), text_key, _VERSION)
    tokens = dataset.map(
        tokenize,
        batched=True,
        remove_columns=columns,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        new_fingerprint=_fingerprint("tokenize", *key),
        desc="Tokenizing",
    )
    return tokens.map(
        pack,
        batched=True,
        batch_size=PACK_BATCH,
        new_fingerprint=_fingerprint("pack", max_seq_len, PACK_BATCH, *key),
        desc=f"Packing into {max_seq_len}-token blocks",
    )
