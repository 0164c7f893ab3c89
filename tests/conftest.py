"""Tiny, seeded fixtures built in-process: nothing is downloaded, every test runs on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CORPUS = [
    "The capital of Veloria is Marnis. Marnis is a city on the river Tol.",
    "Veloria exports copper and salt. Its people speak Velorian.",
    "What is the capital of Veloria? The capital of Veloria is Marnis.",
    "Hello, happy to help! Thank you for asking. Please ask again.",
] * 8


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with the project's special tokens and chat template (vocab about 300)."""
    from pipeline.tokenizer import train_tokenizer

    return train_tokenizer(TINY_CORPUS, vocab_size=320, min_frequency=2)


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer, hidden-32 Llama config matching `tokenizer`."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A seeded tiny causal LM (about 25k parameters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(tiny_tokenizer))


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Bitwise comparisons need a fixed thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(threads)
