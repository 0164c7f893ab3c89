"""Stage 1b: train (or reuse) a tokenizer and pretrain a causal LM on the filtered web-text corpus.

Reads the web-text stage's `final/` (`train/*.parquet`, `validation/*.parquet`, column `text`) or `pretrain.dataset`
(a local parquet/jsonl file or directory, or a Hub dataset id, streamed). Documents are joined with EOS and packed
into `max_seq_len` blocks (cached `datasets.map`); a Llama from a size preset (or `init_from`) is trained with the
transformers Trainer on Accelerate. Writes `run_dir/pretrain/checkpoint-N/` while training (resumed automatically),
TensorBoard logs under `run_dir/pretrain/runs/`, and `run_dir/pretrain/final/`: the model, its tokenizer and
`stage.json` with held-out perplexity, unigram and 3-gram baseline perplexities and, on the demo world, the
fact-cloze accuracy.

    rlhf pretrain recipes/demo.yaml
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m pipeline pretrain recipes/demo.yaml
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset, IterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from pipeline import demo
from pipeline.baselines import baseline_perplexities
from pipeline.checkpoints import begin_stage, final_dir, finishing, newest_checkpoint, stage_dir, write_stage_json
from pipeline.config import PipelineConfig, PretrainConfig
from pipeline.data.packing import tokenize_and_pack
from pipeline.errors import UserError
from pipeline.modeling import build_pretrain_model, default_dtype
from pipeline.preemption import raise_if_preempted
from pipeline.tokenizer import load_tokenizer, prepare_chat_tokenizer, train_tokenizer
from pipeline.tracking import count_parameters, distributed_state, on_main
from pipeline.trainers import train_from, trainer_checkpoint_callback

logger = logging.getLogger(__name__)

STAGE = "pretrain"


# --------------------------------------------------------------------------------------------------------------
# Small pure functions


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Packed blocks (all `max_seq_len` long) -> input_ids and labels; the model shifts labels itself."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def cloze_correct(continuation: str, answer: str) -> bool:
    """True when the generated continuation starts with the answer as a whole word ("Marnis." yes, "Marnisha" no)."""
    text = continuation.lstrip()
    return text.startswith(answer) and not (len(text) > len(answer) and text[len(answer)].isalnum())


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """corpus (the web-text stage's final/ unless pretrain.dataset), and init_from / tokenizer when set."""
    pcfg = cfg.pretrain
    inputs = {"corpus": pcfg.dataset or str(final_dir(cfg, "webtext"))}
    if pcfg.init_from:
        inputs["init_from"] = pcfg.init_from
    if pcfg.tokenizer.name_or_path:
        inputs["tokenizer"] = pcfg.tokenizer.name_or_path
    return inputs


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def _corpus_files(path: Path) -> dict[str, list[str]]:
    """data_files for `load_dataset`: train/ and validation/ subdirectories when present, else every file."""

    def files_in(folder: Path) -> list[str]:
        return sorted(str(p) for p in folder.rglob("*") if p.suffix in _BUILDERS and p.is_file())

    if path.is_file():
        return {"train": [str(path)]}
    splits = {split: files_in(path / split) for split in ("train", "validation") if (path / split).is_dir()}
    splits = {split: files for split, files in splits.items() if files}
    return splits if "train" in splits else {"train": files_in(path)}


def load_corpus(cfg: PipelineConfig, source: str) -> tuple[Dataset | IterableDataset, Dataset]:
    """The (train, validation) documents; a corpus without a validation split gives up `eval_documents` of them."""
    pcfg = cfg.pretrain
    path = Path(source)
    if not path.exists():
        if pcfg.dataset is None:
            raise UserError(
                f"pretrain corpus not found: {path} (run `rlhf webtext RECIPE` first, or set pretrain.dataset to a "
                "parquet/jsonl file or directory with a 'text' column, or a Hub dataset id)"
            )
        if source.startswith((".", "/", "~")) or Path(source).suffix in _BUILDERS or not _HUB_ID.match(source):
            raise UserError(
                f"pretrain.dataset: {source} does not exist (give an existing file or directory, or a Hub id)"
            )
        return _load_hub_corpus(pcfg, source)
    files = _corpus_files(path)
    if not files["train"]:
        raise UserError(
            f"pretrain corpus {path} holds no parquet, jsonl or txt files (the webtext stage writes train/*.parquet)"
        )
    first = Path(files["train"][0])
    if first.suffix not in _BUILDERS:
        raise UserError(f"pretrain corpus {first} is not a parquet, jsonl, json or txt file (name it by its format)")
    if all(Path(f).stat().st_size == 0 for split in files.values() for f in split):
        raise UserError(
            f"pretrain corpus {path} is empty (no documents); give a corpus with a '{pcfg.text_key}' column"
        )
    cache = str(stage_dir(cfg, STAGE) / "cache")
    try:
        splits = load_dataset(_BUILDERS[first.suffix], data_files=files, cache_dir=cache)
    except DatasetGenerationError as exc:  # the file does not parse as its suffix says
        cause = exc.__cause__ or exc
        raise UserError(
            f"pretrain corpus {path} cannot be read as {first.suffix} ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:120] if str(cause) else 'unreadable'}); give parquet, jsonl or txt documents"
        ) from None
    train = splits["train"]
    if len(train) == 0:
        raise UserError(
            f"pretrain corpus {path} is empty (no documents); give a corpus with a '{pcfg.text_key}' column"
        )
    _check_text_column(train, pcfg.text_key, source)
    if "validation" in splits and len(splits["validation"]) > 0:
        return train, splits["validation"]
    if len(train) <= pcfg.eval_documents:
        raise UserError(
            f"pretrain corpus {path} has {len(train)} documents and no validation split; it needs more than "
            f"pretrain.eval_documents={pcfg.eval_documents} (lower it or add validation/*.parquet)"
        )
    held = train.train_test_split(test_size=pcfg.eval_documents, shuffle=True, seed=cfg.seed)
    return held["train"], held["test"]


def _load_hub_corpus(pcfg: PretrainConfig, source: str) -> tuple[IterableDataset, Dataset]:
    if pcfg.max_steps <= 0:
        raise UserError(f"pretrain.max_steps must be set (> 0) to pretrain on the streamed Hub dataset {source}")
    try:
        stream = load_dataset(source, name=pcfg.dataset_config, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - the Hub raises many types; all mean "cannot read it from here"
        raise UserError(
            f"pretrain.dataset: cannot stream {source} from the Hub: {str(exc).splitlines()[0][:200]} "
            "(check the id and pretrain.dataset_config, or give a local path)"
        ) from None
    _check_text_column(stream, pcfg.text_key, source)
    validation = Dataset.from_list([{pcfg.text_key: row[pcfg.text_key]} for row in stream.take(pcfg.eval_documents)])
    train = stream.skip(pcfg.eval_documents).select_columns([pcfg.text_key])
    return train, validation


def _check_text_column(dataset: Dataset | IterableDataset, key: str, source: str) -> None:
    columns = dataset.column_names
    if columns is not None and key not in columns:
        raise UserError(
            f"pretrain corpus {source} has no column '{key}' (columns: {', '.join(columns)}; set pretrain.text_key)"
        )


# --------------------------------------------------------------------------------------------------------------
# Steps


def prepare_tokenizer(
    cfg: PipelineConfig, train_docs: Dataset | IterableDataset
) -> transformers.PreTrainedTokenizerBase:
    """Reuse pretrain.tokenizer.name_or_path (or init_from's), else train a byte-level BPE on the training documents.

    The result is saved in `run_dir/pretrain/tokenizer/` and reloaded from there on resume.
    """
    pcfg, saved = cfg.pretrain, stage_dir(cfg, STAGE) / "tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        return load_tokenizer(saved)
    source = pcfg.tokenizer.name_or_path or pcfg.init_from
    if source:
        tokenizer = load_tokenizer(source)
        added = prepare_chat_tokenizer(tokenizer)
        if added:
            logger.info("added tokens to %s: %s (the embeddings are resized)", source, ", ".join(added))
    else:
        limit = pcfg.tokenizer.max_documents
        docs = train_docs if limit == -1 else train_docs.take(limit)
        texts = (text for batch in docs.iter(batch_size=1000) for text in batch[pcfg.text_key] if text)
        tokenizer = train_tokenizer(texts, pcfg.tokenizer.vocab_size, pcfg.tokenizer.min_frequency)
        logger.info("trained a byte-level BPE tokenizer: %d tokens", len(tokenizer))
    tokenizer.save_pretrained(saved)
    return tokenizer


def pack_corpus(cfg: PipelineConfig, train_docs, eval_docs, tokenizer) -> tuple[Dataset | IterableDataset, Dataset]:
    """Tokenize and pack both splits into `max_seq_len` blocks; cap evaluation at `eval_max_batches`."""
    pcfg = cfg.pretrain
    pack = dict(
        tokenizer=tokenizer, max_seq_len=pcfg.max_seq_len, text_key=pcfg.text_key, num_proc=pcfg.tokenize_num_proc
    )
    train = tokenize_and_pack(train_docs, **pack)
    evaluation = tokenize_and_pack(eval_docs, **pack)
    if isinstance(train, Dataset) and len(train) == 0:
        raise UserError(
            f"the pretraining corpus is shorter than one block of pretrain.max_seq_len={pcfg.max_seq_len} tokens (lower it)"
        )
    if len(evaluation) == 0:
        raise UserError(
            f"the held-out documents are shorter than one block of pretrain.max_seq_len={pcfg.max_seq_len} tokens "
            "(lower max_seq_len or hold out more documents: webtext.heldout_share / pretrain.eval_documents)"
        )
    if pcfg.eval_max_batches > 0:
        world = distributed_state().num_processes
        evaluation = evaluation.select(
            range(min(len(evaluation), pcfg.eval_max_batches * pcfg.per_device_eval_batch_size * world))
        )
    return train, evaluation


def to_trl_args(cfg: PipelineConfig) -> transformers.TrainingArguments:
    """The transformers TrainingArguments for this stage (retention is ours: `trainer_checkpoint_callback`)."""
    return transformers.TrainingArguments(
        **cfg.pretrain.trainer_kwargs(str(stage_dir(cfg, STAGE)), cfg.seed),
        bf16=default_dtype() == torch.bfloat16,  # autocast over float32 weights on a GPU with bf16; CPUs: float32
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )


def evaluate_cloze(model, tokenizer, probes: list[tuple[str, str]]) -> dict[str, Any]:
    """Greedy-complete each "The capital of X is" prefix (after EOS, as a document start) and check the answer."""
    model.eval()
    correct, examples = 0, []
    with torch.no_grad():
        for prefix, answer in probes:
            ids = [tokenizer.eos_token_id] + tokenizer(prefix, add_special_tokens=False)["input_ids"]
            n_new = len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + 1
            inputs = torch.tensor([ids], device=model.device)
            out = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n_new, do_sample=False, use_cache=True
            )
            continuation = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            hit = cloze_correct(continuation, answer)
            correct += hit
            if len(examples) < 5:
                examples.append({"prefix": prefix, "answer": answer, "generated": continuation, "correct": hit})
    return {"cloze_accuracy": correct / max(1, len(probes)), "cloze_probes": len(probes), "cloze_examples": examples}


def evaluate_model(cfg: PipelineConfig, trainer: transformers.Trainer, train, evaluation, tokenizer) -> dict[str, Any]:
    """Held-out loss and perplexity (all ranks), then baselines and cloze probes (main process)."""
    metrics = trainer.evaluate()
    eval_loss = float(metrics["eval_loss"])
    result: dict[str, Any] = {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss)}
    if not distributed_state().is_main_process:
        return result
    eval_blocks = np.asarray(evaluation["input_ids"], dtype=np.int64)
    result["eval_tokens"] = int(eval_blocks.shape[0] * (eval_blocks.shape[1] - 1))
    limit, seq = cfg.pretrain.baseline_max_tokens, cfg.pretrain.max_seq_len
    if isinstance(train, Dataset):
        rows = train[: len(train) if limit == -1 else math.ceil(limit / seq)]["input_ids"]
    else:  # streamed: count the first blocks
        rows = [row["input_ids"] for row in train.take(math.ceil((limit if limit > 0 else 5_000_000) / seq))]
    baselines = baseline_perplexities(np.asarray(rows, dtype=np.int64), eval_blocks, len(tokenizer))
    result.update(baselines)
    result["perplexity_ratio_unigram"] = result["perplexity"] / baselines["unigram_perplexity"]
    result["perplexity_ratio_trigram"] = result["perplexity"] / baselines["trigram_perplexity"]
    if cfg.pretrain.dataset is None and cfg.webtext.input == demo.DEMO:  # the demo crawl's facts
        result.update(evaluate_cloze(trainer.model, tokenizer, demo.cloze_probes(cfg)))
    return result


def prepare_data(cfg: PipelineConfig) -> tuple[transformers.PreTrainedTokenizerBase, Any, Dataset]:
    """Load the corpus, prepare the tokenizer, pack both splits: (tokenizer, train blocks, held-out blocks)."""
    train_docs, eval_docs = load_corpus(cfg, resolve_inputs(cfg)["corpus"])
    tokenizer = prepare_tokenizer(cfg, train_docs)
    train, evaluation = pack_corpus(cfg, train_docs, eval_docs, tokenizer)
    return tokenizer, train, evaluation


# --------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, rerun: bool = False) -> Path:
    """Pretrain (or resume, or skip when finished with the same settings); returns `run_dir/pretrain/final/`."""
    started = time.time()
    args = to_trl_args(cfg)  # sets up the process group under `accelerate launch` (on a CPU too)
    state = distributed_state()
    pcfg, sdir = cfg.pretrain, stage_dir(cfg, STAGE)
    identity, done = begin_stage(cfg, STAGE, resolve_inputs(cfg), rerun)
    if done is not None:
        return done

    # Rank 0 loads, tokenizes and packs; the other ranks get the (file-backed, so cheaply pickled) datasets.
    tokenizer, train, evaluation = on_main(lambda: prepare_data(cfg))

    transformers.set_seed(cfg.seed)
    model = build_pretrain_model(pcfg.model, tokenizer, pcfg.max_seq_len, pcfg.init_from)
    trainable, total = count_parameters(model)
    logger.info("pretrain config: %s", pcfg)
    logger.info(
        "model: %s parameters (%s trainable); %s training blocks of %d tokens",
        f"{total:,}",
        f"{trainable:,}",
        f"{len(train):,}" if isinstance(train, Dataset) else "streamed",
        pcfg.max_seq_len,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=[trainer_checkpoint_callback(sdir, pcfg.save_total_limit)],
    )
    checkpoint = newest_checkpoint(sdir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    train_started = time.time()
    output = train_from(trainer, checkpoint)
    train_seconds = time.time() - train_started
    raise_if_preempted(sdir)

    metrics = evaluate_model(cfg, trainer, train, evaluation, tokenizer)
    digests = [parameter_digest(model)] * state.num_processes
    if state.num_processes > 1:
        torch.distributed.all_gather_object(digests, digests[0])
    steps, world = trainer.state.global_step, state.num_processes
    tokens = steps * pcfg.per_device_train_batch_size * pcfg.gradient_accumulation_steps * world * pcfg.max_seq_len
    metrics.update(
        train_loss=float(output.training_loss),
        train_steps=steps,
        train_tokens=tokens,
        train_seconds=round(train_seconds, 2),
        resumed_from_step=int(checkpoint.name.split("-")[1]) if checkpoint else 0,
        parameters=total,
        world_size=world,
    )
    if state.is_main_process:
        with finishing(cfg, STAGE) as out:
            model.config.use_cache = True  # generation after training wants the KV cache
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            metrics["seconds"] = round(time.time() - started, 2)
            logger.info("pretrain metrics: %s", {k: v for k, v in metrics.items() if k != "cloze_examples"})
            write_stage_json(out, identity, metrics, contents="model", extra={"rank_parameter_digests": digests})
    state.wait_for_everyone()
    return final_dir(cfg, STAGE)
