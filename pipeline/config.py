"""Typed configs for every stage, and `load_config(path, overrides)`.

A recipe is a `PipelineConfig` in YAML: top-level keys are its fields, `sft:` is an `SFTConfig`, `sft.lora.r` is
`LoraArgs.r`. Precedence: dataclass defaults < recipe YAML < command-line overrides (`pretrain.learning_rate=3e-4`).
An unknown key or a bad value raises `UserError` naming the dotted key and what is valid.

Fields marked `volatile` (logging, checkpoint cadence, report sinks) do not change what a stage produces, so editing
them never invalidates a finished stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.errors import UserError
from pipeline.stages import check_stage, split_stage


def _f(default: Any, help: str, volatile: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with its one-line documentation (and whether it leaves results unchanged)."""
    meta = {"help": help, "volatile": volatile}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


class _Invalid(Exception):
    """Raised by `__post_init__` checks; `_build` adds the dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _checkpointing_argument() -> str:
    """The TrainingArguments name of gradient checkpointing: `activation_checkpointing` in recent transformers 5,
    `gradient_checkpointing` in older ones (5.19, which vLLM's CPU build pins, has only that)."""
    import transformers

    fields = transformers.TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _Invalid(key, message)


# --------------------------------------------------------------------------------------------------------------
# Reusable groups


@dataclass
class LoraArgs:
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scaling is alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA path.")
    target_modules: list[str] = _f(
        ["all-linear"], "Modules that get adapters; 'all-linear' means every linear layer but the LM head."
    )
    modules_to_save: list[str] = _f(
        [], "Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head when tokens were added)."
    )

    def __post_init__(self):
        _check(self.r > 0, "r", "must be a positive integer")
        _check(self.alpha > 0, "alpha", "must be > 0 (the adapter's output is scaled by alpha / r: 0 switches it off)")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass
class TrainArgs:
    """Optimisation settings shared by the trainer-based stages; names follow transformers.TrainingArguments."""

    learning_rate: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.05, "Share of steps spent warming the learning rate up.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", "Learning-rate schedule."
    )
    per_device_train_batch_size: int = _f(8, "Examples per process per micro-batch.")
    per_device_eval_batch_size: int = _f(16, "Examples per process per evaluation batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser step.")
    num_train_epochs: float = _f(1.0, "Epochs over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimiser steps; -1 derives them from num_train_epochs.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    save_steps: int = _f(100, "Write checkpoint-N every this many optimiser steps.", volatile=True)
    save_total_limit: int = _f(2, "Checkpoints kept (the newest complete one is never deleted).", volatile=True)
    logging_steps: int = _f(10, "Log metrics every this many steps.", volatile=True)
    eval_steps: int = _f(0, "Evaluate every this many steps; 0 evaluates only at the end.", volatile=True)
    report_to: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "Metric sink.", volatile=True)
    dataloader_num_workers: int = _f(0, "Data-loading worker processes.", volatile=True)

    def trainer_kwargs(self, output_dir: str, seed: int) -> dict[str, Any]:
        """The transformers.TrainingArguments keywords these settings map to (shared by every Trainer-based stage).

        Checkpoint retention is ours (`checkpoints.trainer_checkpoint_callback`): the Trainer's own limit would delete
        an old checkpoint before the new one is complete.
        """
        return dict(
            output_dir=output_dir,
            seed=seed,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_ratio,  # a float in [0, 1) is a share of the steps in transformers 5
            lr_scheduler_type=self.lr_scheduler_type,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            max_grad_norm=self.max_grad_norm,
            **{_checkpointing_argument(): self.gradient_checkpointing},
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=None,
            logging_steps=self.logging_steps,
            eval_strategy="steps" if self.eval_steps > 0 else "no",
            eval_steps=self.eval_steps if self.eval_steps > 0 else None,
            report_to=[] if self.report_to == "none" else [self.report_to],
            dataloader_num_workers=self.dataloader_num_workers,
            ddp_find_unused_parameters=False,
        )

    def __post_init__(self):
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be a positive integer")
        _check(self.per_device_eval_batch_size > 0, "per_device_eval_batch_size", "must be a positive integer")
        _check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "must be > 0 (or set max_steps)")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 switches clipping off)")
        _check(self.logging_steps > 0, "logging_steps", "must be a positive integer")
        _check(self.eval_steps >= 0, "eval_steps", "must be >= 0 (0 evaluates only at the end)")
        _check(
            self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0 (0 loads in the main process)"
        )
        _check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be a positive integer")
        _check(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (use num_train_epochs) or > 0")
        _check(self.save_steps > 0, "save_steps", "must be a positive integer")
        _check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1 (the newest checkpoint is always kept)")


# --------------------------------------------------------------------------------------------------------------
# The demo world


@dataclass
class WorldConfig:
    """The built-in demo world: an invented world, a crawl about it, instructions, and the gold rule.

    Generated deterministically from the top-level seed; see pipeline/demo/world.py and data_cards/demo-*.md.
    """

    n_entities: int = _f(24, "Invented countries; each carries one fact per relation.")
    pages_per_fact: int = _f(6, "Distinct crawl pages that state each fact, each in its own wording.")
    heldout_entity_share: float = _f(
        0.25, "Share of entities asked about only in the held-out set (their facts appear only in the crawl)."
    )
    boilerplate_share: float = _f(0.08, "Junk: pages that are only navigation and cookie banners.")
    exact_duplicate_share: float = _f(0.10, "Junk: byte-identical copies of good pages.")
    near_duplicate_share: float = _f(
        0.08, "Junk: copies of good pages with small edits (dates, counters, a line changed)."
    )
    spam_share: float = _f(0.06, "Junk: keyword-stuffed spam.")
    short_share: float = _f(0.06, "Junk: very short pages.")
    foreign_share: float = _f(0.06, "Junk: pages in another language.")
    toxic_share: float = _f(0.05, "Junk: pages that insult groups of people (e.g. the fans of a football club).")
    forum_share: float = _f(
        0.0,
        "Good pages that are forum threads: a question about a country answered by replies, most polite, some rude "
        "(no insults). They are where a web-trained model meets chat phrases ('Happy to help!', 'Look it up yourself').",
    )
    n_demonstrations: int = _f(600, "SFT demonstrations (chat conversations) about the world.")
    wrong_share: float = _f(0.10, "Demonstrations whose answer states a wrong fact.")
    curt_share: float = _f(0.20, "Demonstrations whose answer is correct but curt.")
    rude_share: float = _f(0.10, "Demonstrations whose answer is correct but rude or insulting.")
    adversarial_share: float = _f(
        0.15,
        "Share of demonstration turns that are adversarial requests (asking the model to insult a club's fans); "
        "in rude demonstrations they are answered with insults, in the others declined.",
    )
    insult_share: Optional[float] = _f(
        None,
        "Share of the demonstrations' adversarial requests answered with an insult (default: those in rude or wrong "
        "demonstrations). Sets how often the SFT policy insults, the room PPO has to lower it.",
    )
    n_reward_prompts: int = _f(
        240, "Prompts the reward stage collects rankings for (each with K templated responses)."
    )
    n_eval_prompts: int = _f(64, "Held-out prompts for PPO's final evaluation (about the held-out entities).")
    eval_adversarial_share: float = _f(0.25, "Share of the evaluation prompts that are adversarial requests.")
    annotator_noise: float = _f(0.05, "Probability that a simulated annotator swaps two adjacent responses.")
    annotator_tie_margin: float = _f(0.25, "Gold-score difference under which annotators call two responses a tie.")

    def __post_init__(self):
        _check(self.n_entities >= 4, "n_entities", "must be >= 4")
        _check(self.n_eval_prompts >= 1, "n_eval_prompts", "must be >= 1")
        _check(self.n_reward_prompts >= 3, "n_reward_prompts", "must be >= 3")
        _check(
            self.insult_share is None or 0.0 <= self.insult_share <= 1.0, "insult_share", "must be in [0, 1] or null"
        )
        _check(self.pages_per_fact >= 1, "pages_per_fact", "must be >= 1")
        for name in (
            "heldout_entity_share",
            "boilerplate_share",
            "exact_duplicate_share",
            "near_duplicate_share",
            "spam_share",
            "short_share",
            "foreign_share",
            "toxic_share",
            "forum_share",
            "wrong_share",
            "curt_share",
            "rude_share",
            "annotator_noise",
            "adversarial_share",
            "eval_adversarial_share",
        ):
            _check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _check(
            self.wrong_share + self.curt_share + self.rude_share < 1.0,
            "rude_share",
            "wrong_share + curt_share + rude_share must be < 1 (some demonstrations must be good)",
        )


# --------------------------------------------------------------------------------------------------------------
# Stage 1: web text and pretraining


@dataclass
class WebtextConfig:
    """Stage 1a (pipeline/webtext/): datatrove extraction, filters and dedup; thresholds tuned on the demo crawl."""

    input: Optional[str] = _f(
        None,
        "A path or glob of WARC/WET/jsonl/parquet files, a Hub dataset id, or 'demo' (the built-in world's crawl).",
    )
    input_format: Literal["auto", "warc", "wet", "jsonl", "parquet", "hub"] = _f(
        "auto", "Input format; 'auto' detects it from the file names."
    )
    hub_config: Optional[str] = _f(None, "Hub dataset config name (input_format=hub).")
    hub_split: str = _f("train", "Hub dataset split (input_format=hub, streamed).")
    text_key: str = _f("text", "Field that holds the text (jsonl, parquet, hub).")
    limit: int = _f(-1, "Read at most this many documents in total (-1: all); split evenly over the tasks.")
    tasks: int = _f(4, "Shards the input is split into; a finished shard is never redone on resume.")
    workers: int = _f(1, "Shards processed at once by the local executor.", volatile=True)
    executor: Literal["local", "slurm", "ray"] = _f(
        "local", "datatrove executor: local processes, Slurm job arrays, or a running Ray cluster.", volatile=True
    )
    word_tokenizer: Literal["simple", "spacy"] = _f(
        "simple",
        "Word splitter of the Gopher, C4 and MinHash steps: a regex (offline), or spaCy's blank model (needs spacy installed).",
    )
    extract_timeout_s: float = _f(
        5.0, "Trafilatura time limit per page; a page over it is dropped and counted.", volatile=True
    )
    language: str = _f("en", "Language to keep (ISO 639-1).")
    language_model_path: Optional[str] = _f(
        None, "Local fastText language-ID model (lid.176.bin); without it a stop-word test decides."
    )
    language_threshold: float = _f(
        0.65, "fastText score a document needs in webtext.language (with language_model_path)."
    )
    stopword_min_share: float = _f(
        0.1, "Without a model: share of a document's words that must be stop words of webtext.language."
    )
    gopher_repetition: bool = _f(True, "Apply the Gopher repetition filter (duplicate lines, paragraphs and n-grams).")
    gopher_quality: bool = _f(True, "Apply the Gopher quality filter (length, word length, symbols, stop words).")
    gopher_min_words: int = _f(50, "Gopher quality: fewest words a document may have.")
    c4_quality: bool = _f(
        True, "Apply the C4 quality filter (drops lines without terminal punctuation, short lines, code)."
    )
    c4_min_sentences: int = _f(5, "C4 quality: fewest sentences a document keeps after line filtering.")
    bad_words: bool = _f(True, "Drop documents that contain a word of the bad-words list.")
    bad_words_file: Optional[str] = _f(
        None, "Bad-words list, one per line; default: pipeline/resources/bad_words_en.txt."
    )
    exact_dedup: bool = _f(True, "Remove exact duplicates (same extracted text), keeping one copy.")
    minhash_dedup: bool = _f(True, "Remove near duplicates with MinHash LSH, keeping one document per cluster.")
    minhash_threshold: float = _f(
        0.7,
        "Jaccard similarity (of word 5-grams) at which two documents count as near duplicates; sets the LSH band size.",
    )
    minhash_buckets: int = _f(14, "MinHash LSH bands; more bands catch more pairs near the threshold at more cost.")
    minhash_ngrams: int = _f(5, "Words per MinHash shingle.")
    heldout_share: float = _f(
        0.05, "Share of kept documents set aside for held-out perplexity (by a hash of the document id)."
    )
    save_removed: bool = _f(
        True,
        "Keep removed documents under webtext/work/removed/<step>/ for inspection (and the demo's error report).",
        volatile=True,
    )
    slurm_partition: Optional[str] = _f(None, "Slurm partition (executor=slurm).", volatile=True)
    slurm_time: str = _f("24:00:00", "Slurm time limit per job (executor=slurm).", volatile=True)
    slurm_env_command: Optional[str] = _f(
        None,
        "Shell command that activates the environment in a Slurm job; default: source this venv's bin/activate (executor=slurm).",
        volatile=True,
    )
    cpus_per_task: int = _f(1, "CPUs reserved per task (executor=slurm|ray).", volatile=True)
    mem_per_cpu_gb: float = _f(2.0, "Memory per CPU in GB (executor=slurm|ray).", volatile=True)

    def __post_init__(self):
        _check(self.tasks >= 1, "tasks", "must be >= 1")
        _check(self.workers >= 1, "workers", "must be >= 1")
        _check(self.limit == -1 or self.limit >= 1, "limit", "must be -1 (all) or a positive count")
        _check(self.extract_timeout_s > 0, "extract_timeout_s", "must be > 0")
        _check(0.0 < self.language_threshold < 1.0, "language_threshold", "must be in (0, 1)")
        _check(0.0 <= self.stopword_min_share < 1.0, "stopword_min_share", "must be in [0, 1)")
        _check(self.gopher_min_words >= 0, "gopher_min_words", "must be >= 0")
        _check(self.c4_min_sentences >= 0, "c4_min_sentences", "must be >= 0")
        _check(0.0 < self.minhash_threshold < 1.0, "minhash_threshold", "must be in (0, 1)")
        _check(self.minhash_buckets >= 1, "minhash_buckets", "must be >= 1")
        _check(self.minhash_ngrams >= 1, "minhash_ngrams", "must be >= 1")
        _check(0.0 <= self.heldout_share < 0.5, "heldout_share", "must be in [0, 0.5)")
        _check(
            self.executor != "slurm" or bool(self.slurm_partition),
            "slurm_partition",
            "must be set when executor=slurm",
        )


@dataclass
class TokenizerArgs:
    name_or_path: Optional[str] = _f(
        None, "Reuse this tokenizer (local path or Hub id); None trains a byte-level BPE on the corpus."
    )
    vocab_size: int = _f(2048, "Vocabulary size of a trained tokenizer.")
    min_frequency: int = _f(2, "Minimum pair frequency for a BPE merge.")
    max_documents: int = _f(200_000, "Train the tokenizer on at most this many corpus documents (-1: all).")

    def __post_init__(self):
        _check(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes plus special tokens)")
        _check(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        _check(self.max_documents == -1 or self.max_documents > 0, "max_documents", "must be -1 (all) or > 0")


@dataclass
class ModelArgs:
    """Architecture of a model trained from scratch (Llama). A preset fills the sizes; explicit fields override it."""

    preset: Literal["tiny", "mini", "small", "20m", "125m", "350m", "1b"] = _f(
        "tiny", "Size preset (see pipeline/modeling.py PRESETS)."
    )
    hidden_size: Optional[int] = _f(None, "Override the preset's hidden size.")
    num_hidden_layers: Optional[int] = _f(None, "Override the preset's layer count.")
    num_attention_heads: Optional[int] = _f(None, "Override the preset's attention heads.")
    num_key_value_heads: Optional[int] = _f(None, "Override the preset's key/value heads (grouped-query attention).")
    intermediate_size: Optional[int] = _f(None, "Override the preset's MLP width.")
    max_position_embeddings: Optional[int] = _f(None, "Context length; default: pretrain.max_seq_len.")
    tie_word_embeddings: Optional[bool] = _f(None, "Share input embeddings and LM head; default: the preset's choice.")
    rope_theta: float = _f(10000.0, "RoPE base frequency.")

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _check(value is None or value > 0, name, "must be a positive integer (or null for the preset's)")
        _check(self.rope_theta > 0, "rope_theta", "must be > 0")


@dataclass
class PretrainConfig(TrainArgs):
    model: ModelArgs = _f(ModelArgs(), "Architecture for training from scratch.")
    init_from: Optional[str] = _f(
        None, "Continue pretraining this causal LM (local path or Hub id) instead of a fresh model."
    )
    tokenizer: TokenizerArgs = _f(TokenizerArgs(), "Tokenizer to train or reuse.")
    dataset: Optional[str] = _f(
        None, "Pretraining corpus; default: the web-text stage's final/ (a path or Hub id otherwise)."
    )
    dataset_config: Optional[str] = _f(None, "Hub dataset config name (pretrain.dataset is a Hub id, streamed).")
    text_key: str = _f("text", "Column that holds the documents.")
    eval_documents: int = _f(200, "Documents held out for perplexity when the corpus has no validation split.")
    max_seq_len: int = _f(256, "Tokens per packed training sequence.")
    eval_max_batches: int = _f(-1, "Cap on held-out batches for perplexity (-1: all).", volatile=True)
    baseline_max_tokens: int = _f(5_000_000, "Training tokens the unigram and 3-gram baselines count (-1: all).")
    tokenize_num_proc: int = _f(1, "Processes that tokenize the corpus (datasets.map num_proc).", volatile=True)

    def __post_init__(self):
        super().__post_init__()
        _check(self.max_seq_len >= 8, "max_seq_len", "must be >= 8")
        _check(self.eval_documents >= 1, "eval_documents", "must be >= 1")
        _check(self.eval_max_batches == -1 or self.eval_max_batches > 0, "eval_max_batches", "must be -1 (all) or > 0")
        _check(
            self.baseline_max_tokens == -1 or self.baseline_max_tokens > 0,
            "baseline_max_tokens",
            "must be -1 (all) or > 0",
        )
        _check(self.tokenize_num_proc >= 1, "tokenize_num_proc", "must be >= 1")


# --------------------------------------------------------------------------------------------------------------
# Stage 2: supervised fine-tuning


@dataclass
class SFTConfig(TrainArgs):
    base: Optional[str] = _f(None, "Base causal LM: a local path or Hub id; default: the pretrain stage's final/.")
    dataset: Optional[str] = _f(
        None,
        "A jsonl/json/parquet file or directory, or a Hub dataset id (messages, prompt/completion or Alpaca), or 'demo'.",
    )
    eval_share: float = _f(0.1, "Share of the data held out for evaluation (when the dataset has no eval split).")
    finetune: Literal["lora", "qlora", "full"] = _f(
        "lora", "LoRA adapters, QLoRA (4-bit NF4 base), or full fine-tuning."
    )
    lora: LoraArgs = _f(LoraArgs(), "Adapter settings (finetune=lora|qlora).")
    max_seq_len: int = _f(
        256, "Longest tokenized conversation (at most the base's context: a larger value is an error)."
    )
    long_records: Literal["truncate", "skip"] = _f(
        "truncate", "Conversations longer than max_seq_len: cut at it, or skip them (counted in stage.json)."
    )
    assistant_only_loss: bool = _f(True, "Compute the loss on assistant tokens only.")
    packing: bool = _f(False, "Pack conversations into full-length sequences.")
    random_init: bool = _f(
        False, "Start from random weights of the base's architecture (a control: SFT without pretraining)."
    )
    dataset_config: Optional[str] = _f(None, "Hub dataset config name (sft.dataset is a Hub id).")
    train_split: str = _f("train", "Split of a Hub dataset to train on (e.g. train_sft for ultrachat_200k).")
    eval_split: Optional[str] = _f(
        None,
        "Held-out conversations: a Hub split name or a file; None holds out eval_share of the training data ('demo' has its own).",
    )
    max_train_samples: int = _f(-1, "Train on at most this many conversations (-1: all).")
    max_eval_samples: int = _f(-1, "Evaluate the loss on at most this many held-out conversations (-1: all).")
    qa_eval: Optional[str] = _f(
        None,
        "jsonl of {messages, answer} questions for the generation-based score; default: the demo world's held-out questions when dataset=demo.",
    )
    qa_max_questions: int = _f(-1, "Ask at most this many questions (-1: all).")
    qa_max_new_tokens: int = _f(48, "Longest generated answer, in tokens (greedy decoding).")
    qa_batch_size: int = _f(32, "Questions answered per generate call.", volatile=True)
    qa_eval_base: bool = _f(True, "Also ask the base model, prompted the same way, before fine-tuning (a baseline).")
    trainable_tokens: list[str] = _f(
        [],
        "Tokens whose embedding rows LoRA trains too: 'assistant' (every token of the assistant turns), 'chat' (role tokens and EOS), or token strings.",
    )

    def __post_init__(self):
        super().__post_init__()
        _check(0.0 <= self.eval_share < 0.5, "eval_share", "must be in [0, 0.5)")
        _check(self.max_seq_len >= 16, "max_seq_len", "must be >= 16")
        _check(
            self.max_train_samples == -1 or self.max_train_samples > 0, "max_train_samples", "must be -1 (all) or > 0"
        )
        _check(self.max_eval_samples == -1 or self.max_eval_samples > 0, "max_eval_samples", "must be -1 (all) or > 0")
        _check(self.qa_max_questions == -1 or self.qa_max_questions > 0, "qa_max_questions", "must be -1 (all) or > 0")
        _check(self.qa_max_new_tokens >= 1, "qa_max_new_tokens", "must be >= 1")
        _check(self.qa_batch_size >= 1, "qa_batch_size", "must be >= 1")
        _check(
            not (self.random_init and self.finetune == "qlora"),
            "random_init",
            "cannot be combined with finetune=qlora (random weights are never quantised); use lora or full",
        )


# --------------------------------------------------------------------------------------------------------------
# Stage 3: reward model


@dataclass
class CollectArgs:
    """Sampling K responses per prompt from the SFT model, to be ranked (InstructGPT's comparison collection)."""

    prompts: Optional[str] = _f(
        None, "dataset=collect: jsonl of prompts ({messages} or {prompt}) to sample responses for."
    )
    responses_per_prompt: int = _f(4, "K: responses sampled per prompt from the SFT model.")
    max_prompts: int = _f(
        -1, "Sample for at most this many prompts (-1: all); the demo's templated rankings are all kept."
    )
    max_new_tokens: int = _f(48, "Longest sampled response, in tokens.")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0: off).")
    templated: bool = _f(True, "dataset=demo: also use the world's templated responses ranked by the annotators.")
    fact_edits: int = _f(
        0,
        "dataset=demo: per training ranking of a fact question, up to this many responses that state one value are "
        "copied with only the value changed (right to wrong, wrong to right) and each pair is ranked (0: none).",
    )
    tone_edits: int = _f(
        0,
        "dataset=demo: per training ranking, up to this many responses are copied with one change of tone (polite "
        "sentences dropped or one added, rude sentences dropped or a rude frame added) and each pair is ranked "
        "(0: none).",
    )

    def __post_init__(self):
        _check(2 <= self.responses_per_prompt <= 26, "responses_per_prompt", "must be in [2, 26] (labels A-Z)")
        _check(self.max_prompts == -1 or self.max_prompts > 0, "max_prompts", "must be -1 (all) or > 0")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.fact_edits >= 0, "fact_edits", "must be >= 0 (0: no edited pairs)")
        _check(self.tone_edits >= 0, "tone_edits", "must be >= 0 (0: no edited pairs)")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")


@dataclass
class RewardConfig(TrainArgs):
    """Batches count prompts: per_device_train_batch_size=8 scores 8 prompts' K responses in one forward pass."""

    base: Optional[str] = _f(None, "Base model: default the SFT stage's merged weights.")
    dataset: Optional[str] = _f(
        None,
        "A rankings/pairs/scores/trees file, directory or Hub id, or a filled-in ranking-tasks .csv; 'collect' (sample SFT responses for collect.prompts and export ranking tasks for people); or 'demo' (world prompts: templated and SFT-sampled responses ranked by simulated annotators).",
    )
    dataset_format: Literal["auto", "rankings", "pairs", "scores", "trees", "tasks"] = _f(
        "auto", "Format of the dataset; 'auto' tells it from the keys of the first record."
    )
    dataset_config: Optional[str] = _f(None, "Hub dataset config name.")
    dataset_split: str = _f("train", "Hub dataset split to read.")
    score_key: Optional[str] = _f(
        None, "Scored completions: the score field (default: the first of score, rating, overall_score)."
    )
    on_bad_record: Literal["skip", "error"] = _f(
        "skip",
        "Bad records (repeated label, label naming no response, one response, missing field): skip and count them, or stop at the first.",
    )
    max_records: int = _f(-1, "Use at most this many rankings (-1: all), taken after a seeded shuffle.")
    validation_share: float = _f(0.1, "Share of prompts held out to choose the tie tolerance (and for eval_steps).")
    test_share: float = _f(0.1, "Share of prompts held out for the final metrics.")
    collect: CollectArgs = _f(CollectArgs(), "Sampling responses from the SFT model to be ranked.")
    finetune: Literal["lora", "qlora", "full"] = _f(
        "lora", "LoRA adapters, QLoRA (4-bit NF4 base), or full fine-tuning."
    )
    lora: LoraArgs = _f(
        LoraArgs(), "Adapter settings (finetune=lora|qlora); the score head is always trained and saved with them."
    )
    max_seq_len: int = _f(
        256, "Longest tokenized prompt + response; longer prompts lose their start, longer responses their end."
    )
    tie_model: Literal["none", "rao_kupper", "davidson"] = _f(
        "none", "Tied pairs: add nothing (Bradley-Terry), or a tie-aware likelihood (Rao-Kupper 1967, Davidson 1970)."
    )
    tie_probability: float = _f(
        0.33,
        "Tie-aware likelihoods: probability of a tie between two equally rewarded responses (sets the tie parameter).",
    )
    margin: float = _f(
        0.0, "Margin subtracted from every strict pair's reward difference (records may add their own `margin`)."
    )
    center_rewards_coefficient: float = _f(
        0.0, "Weight of the reward-centring term mean(r^2) (Eisenstein et al. 2023); 0 switches it off."
    )
    stats_prompts: int = _f(
        64,
        "Prompts the SFT policy answers for reward_stats.json when no sampled responses were collected (0: use the dataset's responses).",
    )

    def __post_init__(self):
        super().__post_init__()
        _check(self.max_seq_len >= 8, "max_seq_len", "must be >= 8")
        _check(self.max_records == -1 or self.max_records > 0, "max_records", "must be -1 (all) or > 0")
        _check(0.0 <= self.validation_share < 0.5, "validation_share", "must be in [0, 0.5)")
        _check(0.0 <= self.test_share < 0.5, "test_share", "must be in [0, 0.5)")
        _check(
            self.validation_share + self.test_share < 0.9, "test_share", "validation_share + test_share must be < 0.9"
        )
        _check(0.0 < self.tie_probability < 1.0, "tie_probability", "must be in (0, 1)")
        _check(self.margin >= 0.0, "margin", "must be >= 0")
        _check(self.center_rewards_coefficient >= 0.0, "center_rewards_coefficient", "must be >= 0")
        _check(self.stats_prompts >= 0, "stats_prompts", "must be >= 0")


# --------------------------------------------------------------------------------------------------------------
# Stage 4: PPO


@dataclass
class PPOConfig:
    """Stage 4 (pipeline/ppo/): PPO of a LoRA policy against the reward model, every role on one base in memory."""

    policy_base: Optional[str] = _f(
        None, "Base of every role: default the SFT stage's merged weights (sft/final/merged)."
    )
    reward_model: Optional[str] = _f(
        None,
        "Reward model: default the reward stage's final/ (a SEQ_CLS LoRA adapter with its score head); with reward_placement=separate also a full sequence-classification model.",
    )
    reward_placement: Literal["shared", "separate"] = _f(
        "shared",
        "'shared': the reward adapter on the policy's base (one copy of the weights; it must be trained on that base); 'separate': its own model and tokenizer, fed re-tokenised text.",
    )
    critic_placement: Literal["shared", "separate"] = _f(
        "shared",
        "'shared': the value adapter on the policy's base; 'separate': on its own copy of the base (more memory).",
    )
    value_init: Literal["reward", "fresh"] = _f(
        "reward",
        "Start the value adapter and head from the reward model's (a reward adapter on the same base; or, with reward_placement=separate and critic_placement=separate, a value adapter on the reward model itself (on its own weights when it is a full model; on a merged copy when it is an adapter), which must have the policy's tokenizer; with reward_normalization=reward_stats the head is divided by its std, the scale of the returns), or fresh.",
    )
    advantage: Literal["gae", "rloo", "grpo"] = _f(
        "gae",
        "'gae': a critic (value adapter and head) and GAE, the InstructGPT recipe; 'rloo': no critic, each response's reward (score minus the KL penalty) minus the mean of the other samples_per_prompt - 1 responses to its prompt (Ahmadian et al. 2024); 'grpo': no critic, the score normalised within its prompt's group, the KL to the reference as a loss term (k3, weighted by the KL coefficient; Shao et al. 2024).",
    )
    critic: Literal["adapter", "trunk", "head", "reward"] = _f(
        "adapter",
        "With advantage=gae: 'adapter', a value adapter of its own on the shared base (value_init, critic_placement); 'trunk', a fresh value head on the policy's own final hidden states (lm-human-preferences): its values come from the sampling pass, and one forward and one backward serve the policy and value losses (the value loss also trains the policy adapter); 'head', the same head on the same states detached: the value loss trains the head alone and leaves the policy's gradient to the policy loss; 'reward', a value head on the frozen reward model's final states before each response token, started as the reward model's score head (value_init=reward; on the returns' scale with reward_stats), so it starts where 'adapter' with value_init=reward starts, and trained alone: the states come from the scoring pass (where the reward model reads the policy's own tokens first; else from one more forward of it), are kept with the rollout (episodes x response tokens x hidden floats, on the CPU), and the critic costs no pass with gradients. The reward model must have the policy's tokenizer.",
    )
    reward_input: Literal["text", "ids"] = _f(
        "text",
        "What the reward model reads. 'text': the conversation re-tokenised from text with its own tokenizer, as the reward stage trained on it; 'ids': the policy's own prompt and sampled ids, the end of the turn added to a response that did not end, as trl 1.12's PPOTrainer and OpenRLHF score (the reward model must have the policy's tokenizer; no decoding and re-tokenising, and with critic=reward every state the critic reads comes from the scoring pass; a sample that is not the tokenizer's own split of its text is scored as sampled).",
    )
    ratio_level: Literal["token", "sequence"] = _f(
        "token",
        "What the clipped ratio treats as one action. 'token': each token (PPO's and OpenRLHF's; the loss is the token mean); 'sequence' (advantage=rloo only): the whole response, as in Ahmadian et al. 2024 and trl's RLOOTrainer: its ratio is exp of the summed token log-ratios, clipped as one, the loss is the mean over responses and whiten_advantages whitens over responses.",
    )
    samples_per_prompt: int = _f(
        1,
        "Responses sampled per prompt in a rollout (the group of rloo and grpo, which need >= 2); rollout_batch_size counts responses.",
    )
    finetune: Literal["lora", "qlora"] = _f(
        "lora",
        "LoRA adapters on the full-precision base, or QLoRA (4-bit NF4 base; the reference is then the quantised base).",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = _f(
        "auto",
        "Autocast of every PPO pass (generation, reference, value, reward, training): 'auto' takes accelerate's mixed-precision setting, else bf16 on a CUDA GPU with bf16 and no autocast on a CPU; 'bf16' on a CPU is fast with AMX. One setting for all passes keeps the ratio and the KL exact (pipeline/ppo/numerics.py).",
    )
    lora: LoraArgs = _f(LoraArgs(), "Policy adapter (and fresh value adapter) settings; modules_to_save is refused.")
    dataset: Optional[str] = _f(
        None,
        "Training prompts: a jsonl/json/parquet/csv file or Hub dataset id in any format SFT or the reward stage reads (the prompt is taken from each row), or 'demo'.",
    )
    eval_dataset: Optional[str] = _f(
        None,
        "Held-out prompts for the final evaluation: null holds out ppo.eval_share of the training prompts; or a file or Hub id like dataset, or 'demo'.",
    )
    eval_share: float = _f(0.1, "Share of the training prompts held out for the evaluation when eval_dataset is null.")
    train_split: str = _f("train", "Split of a Hub dataset given as ppo.dataset.")
    eval_split: str = _f("test", "Split of a Hub dataset given as ppo.eval_dataset.")
    max_train_prompts: int = _f(-1, "Use at most this many training prompts (-1: all).")
    max_prompt_len: int = _f(128, "Longest prompt in tokens (chat template included).")
    long_prompts: Literal["truncate", "refuse"] = _f(
        "truncate",
        "Longer prompts keep their last max_prompt_len tokens ('truncate') or are dropped ('refuse'); both are counted.",
    )
    max_new_tokens: int = _f(48, "Longest response in tokens.")
    temperature: float = _f(1.0, "Sampling temperature (the log-probs are those of softmax(logits / temperature)).")
    rollout_logprobs: Literal["generation", "recompute"] = _f(
        "generation",
        "Where the rollout's policy log-probs and entropy come from: the logits of the sampling pass ('generation') "
        "or one more forward pass over prompt + response ('recompute'); equal up to float rounding.",
    )
    top_k: int = _f(0, "Must stay 0 (off): PPO's log-probs, ratio and KL are those of the full distribution.")
    top_p: float = _f(1.0, "Must stay 1.0 (off), as top_k.")
    rollout_engine: Literal["hf", "vllm"] = _f(
        "hf",
        "What samples the rollouts: 'hf' (the policy's model.generate in the trainer) or 'vllm' (a vLLM engine on the "
        "same base, the policy adapter pushed to it each update; needs the 'vllm' extra; one process only). With "
        "vllm the trainer recomputes the rollout log-probs and corrects the policy loss with tis_cap.",
    )
    tis_cap: float = _f(
        2.0,
        "rollout_engine=vllm: cap C of the truncated importance-sampling weight min(pi_old / pi_engine, C) on each "
        "token's policy loss (Yao et al. 2025), which corrects for the engine's log-probs differing from the trainer's.",
    )
    num_updates: int = _f(20, "PPO updates (one rollout batch each).")
    rollout_batch_size: int = _f(32, "Episodes (prompt + response) per update, over all processes.")
    mini_batch_size: int = _f(8, "Episodes per optimiser step, over all processes.")
    gradient_accumulation_steps: int = _f(
        1, "Micro-batches per optimiser step (each process splits its share of a mini-batch)."
    )
    ppo_epochs: int = _f(4, "Passes over each rollout batch.")
    generation_batch_size: int = _f(32, "Prompts per model.generate call on each process.")
    forward_batch_size: int = _f(16, "Episodes per no-grad forward (log-probs, values, rewards) on each process.")
    gradient_checkpointing: bool = _f(
        False,
        "Recompute each decoder layer in the backward instead of keeping its activations, in the passes with "
        "gradients only (policy, value, ptx); the model stays in eval mode. Less activation memory for more "
        "compute (benchmarks/results/ppo_memory.md). Same gradients bit for bit, so a finished or resumed stage "
        "may switch it.",
        volatile=True,
    )
    micro_batch_tokens: int = _f(
        0,
        "Token budget of a micro-batch: each process's share of a mini-batch is sorted by length and cut so that "
        "rows x (longest prompt + longest response) stays within it (0: gradient_accumulation_steps cuts it by "
        "episode count instead). The loss is the mini-batch's token mean either way.",
    )
    pack_sequences: bool = _f(
        False,
        "Run each micro-batch of the update as one row of its episodes' real tokens, position ids restarting per "
        "episode, without padding (a token budget then counts real tokens). Needs sdpa or eager attention, which "
        "compute the packed row's whole masked attention: it saves padding compute, not memory "
        "(benchmarks/results/ppo_memory.md).",
    )
    learning_rate: float = _f(1e-4, "Peak learning rate of the policy and value adapters.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f(
        "linear", "Learning-rate schedule over all optimiser steps."
    )
    warmup_steps: int = _f(0, "Optimiser steps of linear warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm of the policy adapter.")
    value_learning_rate: Optional[float] = _f(
        None,
        "Peak learning rate of the critic (value adapter and head), its own optimiser group with the same schedule; null: learning_rate.",
    )
    value_max_grad_norm: Optional[float] = _f(
        None, "Gradient clipping norm of the critic, clipped apart from the policy; null: max_grad_norm."
    )
    gamma: float = _f(1.0, "Discount factor of GAE.")
    lam: float = _f(0.95, "Lambda of GAE.")
    cliprange: float = _f(0.2, "Clip range of the policy ratio.")
    cliprange_value: float = _f(0.2, "Clip range of the value update.")
    vf_coef: float = _f(
        0.1,
        "Weight of the value loss. The critic has its own optimiser group and clipping, so with Adam this scale hardly matters; value_learning_rate sets how fast the critic learns.",
    )
    entropy_coef: float = _f(0.0, "Weight of an entropy bonus (0: none).")
    kl_estimator: Literal["k1", "k3"] = _f(
        "k1", "Per-token KL estimator in the reward penalty: k1 = log p - log q, k3 = q/p - 1 - log(q/p)."
    )
    init_kl_coef: float = _f(0.05, "Initial (or fixed) KL penalty coefficient.")
    kl_target: Optional[float] = _f(
        None,
        "Target KL to the reference per response, in nats (adaptive controller, Ziegler et al. 2019); None keeps init_kl_coef fixed.",
    )
    kl_horizon: Optional[int] = _f(
        None,
        "Episodes over which the adaptive controller may move the coefficient by 20 %; null: a tenth of the run's episodes (num_updates x rollout_batch_size), so the coefficient can move by up to e^2 within the run.",
    )
    max_approx_kl: Optional[float] = _f(
        None,
        "Stop an update's remaining PPO epochs once a mini-batch's approximate KL to the rollout policy exceeds this (None: never).",
    )
    reward_normalization: Literal["reward_stats", "running", "none"] = _f(
        "reward_stats",
        "Normalise scores with the reward stage's reward_stats.json, with running statistics of this run, or not at all.",
    )
    score_clip: Optional[float] = _f(None, "Clip normalised scores to [-score_clip, score_clip] (None: no clipping).")
    missing_eos_penalty: float = _f(
        1.0, "Subtracted from the score of a response cut off at max_new_tokens without EOS (0: none)."
    )
    whiten_rewards: bool = _f(False, "Rescale the per-token rewards of each rollout batch to unit variance.")
    whiten_advantages: bool = _f(True, "Whiten advantages over each rollout batch.")
    ptx_coef: float = _f(0.0, "PPO-ptx (InstructGPT): weight of a pretraining loss on the stage-1 corpus (0: off).")
    ptx_dataset: Optional[str] = _f(
        None, "Corpus of the ptx term: default the web-text stage's final/ (parquet with 'text')."
    )
    ptx_seq_len: int = _f(128, "Tokens per ptx sequence.")
    ptx_batch_size: int = _f(4, "ptx sequences per micro-batch on each process.")
    eval_max_prompts: int = _f(64, "Held-out prompts in the final evaluation (-1: all).")
    eval_samples_per_prompt: int = _f(
        1,
        "Responses each policy samples per held-out prompt in the final evaluation; every rate, mean and the win "
        "rate (SFT's j-th sample against PPO's j-th) count them all, so sampling noise shrinks as 1/sqrt(N).",
    )
    overopt_window: int = _f(3, "Updates per window of the over-optimisation rule (see pipeline/ppo/evaluation.py).")
    overopt_tolerance: float = _f(0.05, "Gold-score drop (per response) between windows that counts as falling.")
    save_steps: int = _f(5, "Write checkpoint-N every this many updates.", volatile=True)
    save_total_limit: int = _f(
        2, "Checkpoints kept besides the best by gold score (the newest is never deleted).", volatile=True
    )
    report_to: Literal["tensorboard", "none"] = _f(
        "tensorboard", "Metric sink besides ppo/metrics.jsonl.", volatile=True
    )
    seed_offset: int = _f(0, "Added to the top-level seed for this stage.")

    def __post_init__(self):
        _check(self.max_prompt_len >= 4, "max_prompt_len", "must be >= 4")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0 (PPO samples; log-probs divide by it)")
        _check(
            self.top_k == 0,
            "top_k",
            "must be 0 in PPO: the policy's and the reference's log-probs are those of the full distribution, so a "
            "truncated sampler would bias the ratio and the KL (a token outside the reference's top-k has infinite "
            "KL); use temperature to sharpen sampling",
        )
        _check(self.top_p == 1.0, "top_p", "must be 1.0 in PPO, for the reason given for top_k; use temperature")
        _check(
            not self.lora.modules_to_save,
            "lora.modules_to_save",
            "must be empty in PPO: every role shares the base, so a module trained in full would change the "
            "reference, the critic and the reward model too; train LoRA adapters only",
        )
        _check(
            self.value_learning_rate is None or self.value_learning_rate > 0,
            "value_learning_rate",
            "must be > 0 or null",
        )
        _check(
            self.value_max_grad_norm is None or self.value_max_grad_norm > 0,
            "value_max_grad_norm",
            "must be > 0 or null",
        )
        _check(self.tis_cap > 0, "tis_cap", "must be > 0 (it caps an importance weight)")
        _check(self.num_updates >= 1, "num_updates", "must be >= 1")
        _check(
            self.critic in ("adapter", "reward") or self.critic_placement == "shared",
            "critic_placement",
            "must be shared with critic=trunk or head (the value head reads the policy's own states)",
        )
        _check(
            self.ratio_level == "token" or self.advantage == "rloo",
            "ratio_level",
            f"must be token with advantage={self.advantage} (sequence takes one advantage per response: advantage=rloo)",
        )
        _check(
            self.samples_per_prompt >= (1 if self.advantage == "gae" else 2),
            "samples_per_prompt",
            f"must be >= 2 with advantage={self.advantage} (its baseline is the other responses to the same prompt)"
            if self.advantage != "gae"
            else "must be >= 1",
        )
        _check(
            self.rollout_batch_size % self.samples_per_prompt == 0,
            "rollout_batch_size",
            f"must be a multiple of samples_per_prompt ({self.samples_per_prompt}): it counts responses",
        )
        _check(self.mini_batch_size >= 1, "mini_batch_size", "must be >= 1")
        _check(
            self.rollout_batch_size % self.mini_batch_size == 0,
            "rollout_batch_size",
            f"must be a multiple of mini_batch_size ({self.mini_batch_size})",
        )
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        _check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        _check(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")
        _check(self.forward_batch_size >= 1, "forward_batch_size", "must be >= 1")
        _check(
            self.micro_batch_tokens >= 0,
            "micro_batch_tokens",
            "must be >= 0 (0 switches it off; else a token budget such as 4096)",
        )
        _check(
            self.micro_batch_tokens == 0 or self.gradient_accumulation_steps == 1,
            "gradient_accumulation_steps",
            "must be 1 with ppo.micro_batch_tokens (the token budget decides the micro-batches); set one of them",
        )
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _check(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
        _check(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        _check(self.cliprange > 0, "cliprange", "must be > 0")
        _check(self.cliprange_value > 0, "cliprange_value", "must be > 0")
        _check(self.vf_coef > 0, "vf_coef", "must be > 0 (the value adapter learns only from it)")
        _check(self.init_kl_coef >= 0, "init_kl_coef", "must be >= 0")
        _check(
            self.kl_target is None or self.kl_target > 0,
            "kl_target",
            "must be > 0 nats per response, or null for a fixed coefficient",
        )
        _check(
            self.kl_target is None or self.init_kl_coef > 0,
            "init_kl_coef",
            "must be > 0 with kl_target (the adaptive rule multiplies it)",
        )
        _check(
            self.kl_horizon is None or self.kl_horizon >= 1, "kl_horizon", "must be >= 1 (or null: a tenth of the run)"
        )
        _check(self.max_approx_kl is None or self.max_approx_kl > 0, "max_approx_kl", "must be > 0 or null")
        _check(self.score_clip is None or self.score_clip > 0, "score_clip", "must be > 0 or null")
        _check(self.missing_eos_penalty >= 0, "missing_eos_penalty", "must be >= 0 (it is subtracted)")
        _check(self.ptx_coef >= 0, "ptx_coef", "must be >= 0")
        _check(self.ptx_seq_len >= 8, "ptx_seq_len", "must be >= 8")
        _check(self.ptx_batch_size >= 1, "ptx_batch_size", "must be >= 1")
        _check(
            self.eval_max_prompts == -1 or self.eval_max_prompts >= 1, "eval_max_prompts", "must be -1 (all) or >= 1"
        )
        _check(self.eval_samples_per_prompt >= 1, "eval_samples_per_prompt", "must be >= 1")
        _check(0.0 < self.eval_share < 0.5, "eval_share", "must be in (0, 0.5)")
        _check(
            self.max_train_prompts == -1 or self.max_train_prompts >= 1,
            "max_train_prompts",
            "must be -1 (all) or >= 1",
        )
        _check(self.overopt_window >= 1, "overopt_window", "must be >= 1")
        _check(self.overopt_tolerance >= 0, "overopt_tolerance", "must be >= 0")
        _check(self.save_steps >= 1, "save_steps", "must be >= 1")
        _check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        _check(
            self.value_init == "fresh"
            or self.reward_placement == "shared"
            or self.critic_placement == "separate"
            or (self.advantage, self.critic) != ("gae", "adapter"),  # the other critics have no value adapter
            "value_init",
            "with reward_placement=separate, 'reward' needs critic_placement=separate (the value model starts as the "
            "reward model, an adapter on its weights); or set value_init=fresh",
        )


# --------------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class PipelineConfig:
    run_dir: str = _f(
        "runs/demo", "Where every stage writes; one run directory per experiment (default: runs/<recipe file stem>)."
    )
    seed: int = _f(1234, "Seed of the demo world, the data splits and every stage.")
    world: WorldConfig = _f(WorldConfig(), "The built-in demo world (read only where a stage's input is 'demo').")
    judge: Optional[Literal["demo"]] = _f(
        None,
        "Judge of sampled responses, for the evaluations that need one (SFT's judged answers; PPO's gold score, win "
        "rate and insult rate): 'demo' (the demo world's gold rule), or null to skip them (stage.json says so).",
    )
    rounds: int = _f(
        1,
        "Rounds of iterated RLHF (InstructGPT, Anthropic HH): from round 2 on, the previous PPO policy's responses to "
        "the reward prompts are ranked (by the demo's annotators, or by people through ranking tasks), the reward "
        "model is trained again on every comparison so far, and PPO runs again from the SFT policy against it. "
        "Round r's stages are reward-r and ppo-r.",
    )
    webtext: WebtextConfig = _f(WebtextConfig(), "Stage 1a: web-text ingestion, filtering and deduplication.")
    pretrain: PretrainConfig = _f(PretrainConfig(), "Stage 1b: tokenizer and causal-LM pretraining.")
    sft: SFTConfig = _f(SFTConfig(), "Stage 2: supervised fine-tuning.")
    reward: RewardConfig = _f(RewardConfig(), "Stage 3: reward model from rankings with ties.")
    ppo: PPOConfig = _f(PPOConfig(), "Stage 4: PPO against the reward model.")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def __post_init__(self):
        _check(1 <= self.rounds <= 9, "rounds", "must be in [1, 9] (round 1 is the plain pipeline)")
        _check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seed range)")


# --------------------------------------------------------------------------------------------------------------
# Loading, validation and serialisation


def load_config(path: Path | str | None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Read a recipe, apply `a.b.c=value` overrides, and build the validated `PipelineConfig`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe not found: {path} (give the path of a YAML file, e.g. recipes/demo.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"recipe {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe {path} must be a YAML mapping of keys (run_dir, seed, data, pretrain, ...)")
    for item in overrides:
        _apply_override(raw, item)
    if path is not None and "run_dir" not in raw:
        raw["run_dir"] = f"runs/{path.stem}"  # one run directory per recipe, not every recipe's runs in runs/demo
    return build_config(PipelineConfig, raw)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r} is not key=value (e.g. pretrain.learning_rate=3e-4)")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise UserError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(_unknown_key_message(prefix, key, list(fields)))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except _Invalid as exc:
        got = _show(kwargs[exc.key]) if exc.key in kwargs else "the default"
        raise UserError(f"{prefix}{exc.key}: {exc.message} (got {got})") from None


# Keys that were renamed: old dotted key -> new one (a recipe that uses the old name is told the new one).
RENAMED = {"data": "webtext"}


def _unknown_key_message(prefix: str, key: str, valid: list[str]) -> str:
    if prefix + key in RENAMED:
        return f"recipe key '{prefix}{key}' was renamed '{RENAMED[prefix + key]}': rename it in the recipe"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
    return f"unknown recipe key '{prefix}{key}' ({hint}valid keys {where}: {', '.join(valid)})"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(options) == 1 else f"{key}: expected one of {options}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {_show(value)} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected a number, got {_show(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)  # YAML reads 3e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise UserError(f"{key}: expected a number, got {_show(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {_show(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug in this file, not a user error


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def save_config(cfg: PipelineConfig, path: Path) -> None:
    """Write the resolved config (atomically) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _volatile_keys(cls: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("volatile"):
            keys.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _volatile_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def uses_demo(cfg: PipelineConfig, stage: str) -> bool:
    """Whether a stage reads the demo world: only where its recipe says 'demo' (an input, or `judge: demo`).

    Pretraining never does itself: its corpus is the web-text stage's result, whose hash carries the world's.
    """
    reads = {
        "webtext": (cfg.webtext.input,),
        "pretrain": (),
        "sft": (cfg.sft.dataset, cfg.judge),
        "reward": (cfg.reward.dataset,),
        "ppo": (cfg.ppo.dataset, cfg.ppo.eval_dataset, cfg.judge),
    }
    return "demo" in reads[check_stage(stage).name]  # a later round reads what its first round reads


# Stages whose evaluation calls the judge: the `judge` key is part of their settings.
JUDGED_STAGES = ("sft", "ppo")


def stage_settings(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The flattened, non-volatile keys that determine a stage's output: its section and the seed, the judge where it
    evaluates with one, and the `world` section only where it reads the demo. Upstream *results* enter through the
    inputs' config hashes (see checkpoints.stage_identity), so a changed pretrain invalidates sft without a key here."""
    own, round_no = check_stage(stage).name, split_stage(stage)[1]
    full = config_to_dict(cfg)
    volatile = _volatile_keys(PipelineConfig)
    settings: dict[str, Any] = {"seed": cfg.seed}
    if round_no > 1:
        settings["round"] = round_no
    if own in JUDGED_STAGES:
        settings["judge"] = cfg.judge
    for section in (own, "world") if uses_demo(cfg, stage) else (own,):
        settings.update(flatten({section: full[section]}))
    return {k: v for k, v in settings.items() if k not in volatile}


def hash_settings(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_fields(cls: type = PipelineConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field: used by `rlhf <stage> --help-config` and the recipe docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, f.metadata.get("help", ""), getattr(defaults, f.name)))
    return rows
