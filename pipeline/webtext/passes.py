"""The datatrove passes of the web-text stage (stage 1a): how they are built, executed (local, Slurm, Ray) and counted.

    filter         read -> Trafilatura (WARC) -> language -> Gopher repetition -> Gopher quality -> C4 -> bad words
    exact_find     exact-duplicate signatures of all shards -> duplicate lists        (1 task)
    exact_filter   drop exact duplicates
    minhash_*      MinHash LSH buckets (one task per band) -> clusters (1 task)
    output         drop near duplicates, tag train/validation by id hash, write parquet

Each pass is one datatrove executor whose completion markers (`work/logs/<pass>/completions/`) make a re-run skip
finished shards. Passes hand documents on as `work/<stage>/{rank:05d}.jsonl.gz`, read back by the same rank, because
datatrove's dedup steps address a document by its rank and position.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, WebtextConfig
from pipeline.errors import UserError
from pipeline.preemption import Preempted, preemption_signalled
from pipeline.webtext.stopwords import STOP_WORDS

# filters.py (datatrove's steps) is imported inside the functions that build passes: checking a recipe or the state
# of a finished stage needs no datatrove.

logger = logging.getLogger(__name__)

# The config keys that loosen each step, for the error raised when filtering empties the corpus.
LOOSEN = {
    "read": "webtext.input / webtext.input_format / webtext.text_key",
    "extract": "the input (Trafilatura found no main text: are these HTML pages? WET/jsonl input skips extraction)",
    "language": "webtext.stopword_min_share or webtext.language (webtext.language_threshold with a fastText model)",
    "gopher_repetition": "webtext.gopher_repetition=false",
    "gopher_quality": "webtext.gopher_min_words (or webtext.gopher_quality=false)",
    "c4_quality": "webtext.c4_min_sentences (or webtext.c4_quality=false)",
    "bad_words": "webtext.bad_words_file (or webtext.bad_words=false)",
}


@dataclass
class Source:
    """Where the documents come from: files under `folder` in one format, or a Hub dataset id."""

    format: str
    description: str
    folder: str = ""
    files: list[str] = field(default_factory=list)
    hub_id: str | None = None


@dataclass
class Pass:
    """One datatrove executor's worth of work. `tallies`: step label -> (index of the step or None, of its Tally)."""

    name: str
    pipeline: list
    tasks: int
    tallies: dict[str, tuple[int | None, int]] = field(default_factory=dict)
    split_index: int | None = None


def minhash_bands(threshold: float, buckets: int) -> tuple[int, int, float]:
    """(bands b, rows per band r, effective threshold): LSH pairs documents above about (1/b)^(1/r) similarity."""
    rows = max(1, round(math.log(1.0 / buckets) / math.log(threshold)))
    return buckets, rows, (1.0 / buckets) ** (1.0 / rows)


# --------------------------------------------------------------------------------------------------------------
# Building


def check_settings(webtext: WebtextConfig) -> None:
    """Settings that only the local machine can judge (files, installed packages), checked before any work starts."""
    for key in ("language_model_path", "bad_words_file"):
        path = getattr(webtext, key)
        if path and not Path(path).expanduser().is_file():
            raise UserError(f"webtext.{key}: {path} is not a file (give the path of a local file, or leave it unset)")
    if not webtext.language_model_path and webtext.language not in STOP_WORDS:
        raise UserError(
            f"webtext.language={webtext.language!r} has no stop-word list (known: {', '.join(STOP_WORDS)}); "
            "give a fastText model with webtext.language_model_path"
        )
    if webtext.word_tokenizer == "spacy":
        word_tokenizer(webtext)  # spaCy installed


def build_passes(cfg: PipelineConfig, source: Source, work: Path) -> list[Pass]:
    """The passes the config asks for, in order."""
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    from pipeline.webtext import filters as F

    webtext = cfg.webtext
    words = word_tokenizer(webtext)
    exact = ExactDedupConfig(content_getter=F.document_text)
    bands, rows, _ = minhash_bands(webtext.minhash_threshold, webtext.minhash_buckets)
    minhash = MinhashConfig(n_grams=webtext.minhash_ngrams, num_buckets=bands, hashes_per_bucket=rows, seed=cfg.seed)
    exact_sigs, exact_dups, minhash_sigs, minhash_pairs, minhash_remove = (
        str(work / d) for d in ("exact_sigs", "exact_dups", "minhash_sigs", "minhash_pairs", "minhash_remove")
    )

    def removed(label: str):
        return JsonlWriter(str(work / "removed" / label)) if webtext.save_removed else None

    passes = []
    first = [build_reader(webtext, source, work)] + ([F.LimitDocuments(webtext.limit)] if webtext.limit > 0 else [])
    pipeline, tallies = with_tallies(first, [("read", None), *filter_steps(webtext, source, words, removed)])
    pipeline.append(JsonlWriter(str(work / "filtered")))
    if webtext.exact_dedup:
        pipeline.append(ExactDedupSignature(exact_sigs, config=exact))
    elif webtext.minhash_dedup:
        pipeline.append(MinhashDedupSignature(minhash_sigs, config=minhash, language=words))
    passes.append(Pass("filter", pipeline, webtext.tasks, tallies))
    current = work / "filtered"
    if webtext.exact_dedup:
        passes.append(Pass("exact_find", [ExactFindDedups(exact_sigs, exact_dups, config=exact)], 1))
        dedup = ExactDedupFilter(exact_dups, config=exact, exclusion_writer=removed("exact_dedup"))
        pipeline, tallies = with_tallies([F.ShardFileReader(str(current))], [("exact_dedup", dedup)])
        current = work / "exact"
        pipeline.append(JsonlWriter(str(current)))
        if webtext.minhash_dedup:
            pipeline.append(MinhashDedupSignature(minhash_sigs, config=minhash, language=words))
        passes.append(Pass("exact_filter", pipeline, webtext.tasks, tallies))
    last_steps = []
    if webtext.minhash_dedup:
        passes.append(
            Pass("minhash_buckets", [MinhashDedupBuckets(minhash_sigs, minhash_pairs, config=minhash)], bands)
        )
        passes.append(Pass("minhash_cluster", [MinhashDedupCluster(minhash_pairs, minhash_remove, config=minhash)], 1))
        dedup = MinhashDedupFilter(minhash_remove, exclusion_writer=removed("minhash_dedup"))
        last_steps.append(("minhash_dedup", dedup))
    pipeline, tallies = with_tallies([F.ShardFileReader(str(current))], last_steps)
    split_index = len(pipeline)
    schema = output_schema()
    pipeline.append(F.SplitTagger(webtext.heldout_share, cfg.seed))
    pipeline.append(
        ParquetWriter(str(work / "output"), "${split}/${rank}.parquet", adapter=F.output_row, schema=schema)
    )
    passes.append(Pass("output", pipeline, webtext.tasks, tallies, split_index))
    return passes


def filter_steps(webtext: WebtextConfig, source: Source, words: Any, removed: Any) -> list[tuple[str, Any]]:
    """(label, step) for extraction and every enabled filter, in FineWeb's order."""
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from pipeline.webtext import filters as F

    steps: list[tuple[str, Any]] = []
    if source.format == "warc":  # WET, jsonl, parquet and Hub text is already extracted
        extractor = F.TrafilaturaExtractor(favour_precision=True, timeout=webtext.extract_timeout_s, deduplicate=False)
        steps.append(("extract", extractor))
    if webtext.language_model_path:
        language = F.FastTextLanguageFilter(
            webtext.language_model_path, [webtext.language], webtext.language_threshold, removed("language")
        )
    else:
        language = F.StopWordLanguageFilter(webtext.language, webtext.stopword_min_share, removed("language"))
    steps.append(("language", language))
    if webtext.gopher_repetition:
        steps.append(
            (
                "gopher_repetition",
                GopherRepetitionFilter(language=words, exclusion_writer=removed("gopher_repetition")),
            )
        )
    if webtext.gopher_quality:
        gopher = GopherQualityFilter(
            min_doc_words=webtext.gopher_min_words, language=words, exclusion_writer=removed("gopher_quality")
        )
        steps.append(("gopher_quality", gopher))
    if webtext.c4_quality:
        c4 = C4QualityFilter(
            min_num_sentences=webtext.c4_min_sentences, language=words, exclusion_writer=removed("c4_quality")
        )
        steps.append(("c4_quality", c4))
    if webtext.bad_words:
        steps.append(("bad_words", F.BadWordsFilter(F.load_bad_words(webtext.bad_words_file), removed("bad_words"))))
    return steps


def with_tallies(first: list, steps: list[tuple[str, Any]]) -> tuple[list, dict[str, tuple[int | None, int]]]:
    """Pipeline `first + steps` with a Tally after each step (a None step: tally what `first` yields)."""
    from pipeline.webtext.filters import Tally

    pipeline, tallies = list(first), {}
    for label, step in steps:
        if step is not None:
            pipeline.append(step)
        tallies[label] = (len(pipeline) - 1 if step is not None else None, len(pipeline))
        pipeline.append(Tally(label))
    return pipeline, tallies


def build_reader(webtext: WebtextConfig, source: Source, work: Path) -> Any:
    """datatrove reader for the source; local files are listed in work/input_files.txt (stable across resumes)."""
    from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader

    from pipeline.webtext.filters import TolerantWarcReader

    if source.format == "hub":
        options = {"split": webtext.hub_split, **({"name": webtext.hub_config} if webtext.hub_config else {})}
        return HuggingFaceDatasetReader(
            source.hub_id, dataset_options=options, streaming=True, text_key=webtext.text_key
        )
    work.mkdir(parents=True, exist_ok=True)
    paths_file = work / "input_files.txt"
    paths_file.write_text("".join(f"{name}\n" for name in source.files))
    if source.format in ("warc", "wet"):
        return TolerantWarcReader(source.folder, paths_file=str(paths_file))
    reader = JsonlReader if source.format == "jsonl" else ParquetReader
    return reader(source.folder, paths_file=str(paths_file), text_key=webtext.text_key)


def word_tokenizer(webtext: WebtextConfig) -> Any:
    """The word splitter of the Gopher, C4 and MinHash steps (datatrove's own English one needs spaCy)."""
    if webtext.word_tokenizer == "spacy":
        try:
            import spacy  # noqa: F401
        except ImportError:
            raise UserError(
                "webtext.word_tokenizer=spacy needs spaCy: pip install spacy (or webtext.word_tokenizer=simple)"
            ) from None
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        return load_word_tokenizer(webtext.language)
    from pipeline.webtext.filters import SimpleWordTokenizer

    return SimpleWordTokenizer()


def output_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string())])


# --------------------------------------------------------------------------------------------------------------
# Executing


def build_executor(cfg: PipelineConfig, step: Pass, work: Path, depends: Any = None) -> Any:
    """The datatrove executor of one pass (`webtext.executor`), logging and marking completions in work/logs/<pass>/."""
    webtext = cfg.webtext
    common = {
        "pipeline": step.pipeline,
        "tasks": step.tasks,
        "logging_dir": str(work / "logs" / step.name),
        "depends": depends,
    }
    if webtext.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(workers=min(webtext.workers, step.tasks), **common)
    if webtext.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        activate = Path(sys.prefix) / "bin" / "activate"  # this virtual environment, on the cluster's shared disk
        env_command = webtext.slurm_env_command or (f"source {activate}" if activate.is_file() else None)
        # datatrove writes mem_per_cpu_gb as "<value>G", which sbatch rejects for a float ("2.0G"): give megabytes
        memory = {"mem-per-cpu": f"{math.ceil(webtext.mem_per_cpu_gb * 1024)}M"}
        return SlurmPipelineExecutor(
            time=webtext.slurm_time,
            partition=webtext.slurm_partition,
            cpus_per_task=webtext.cpus_per_task,
            sbatch_args=memory,
            job_name=f"rlhf-webtext-{step.name}",
            env_command=env_command,
            **common,
        )
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(cpus_per_task=webtext.cpus_per_task, mem_per_cpu_gb=webtext.mem_per_cpu_gb, **common)


def run_passes(cfg: PipelineConfig, passes: list[Pass], work: Path) -> None:
    """Run every pass to completion; shards finished by an earlier run are skipped."""
    if cfg.webtext.executor == "slurm":
        if shutil.which("sbatch") is None:
            raise UserError(
                "webtext.executor=slurm needs Slurm's sbatch on PATH (run it on a login node, or webtext.executor=local)"
            )
        executors: list[Any] = []
        for step in passes:
            executors.append(build_executor(cfg, step, work, depends=executors[-1] if executors else None))
        executors[-1].run()  # submits the whole chain as dependent job arrays
        with stop_on_signal():  # stops waiting; the submitted jobs run on
            wait_for_slurm(executors)
        return
    if cfg.webtext.executor == "ray":
        try:
            import ray
        except ImportError:
            raise UserError(
                "webtext.executor=ray needs ray: pip install 'datatrove[ray]' (or webtext.executor=local)"
            ) from None
        if not ray.is_initialized():
            ray.init()  # joins the cluster named by RAY_ADDRESS, or starts a local one
    with stop_on_signal():
        for step in passes:
            executor = build_executor(cfg, step, work)
            executor.run()
            if executor.get_incomplete_ranks(skip_completed=True):
                raise RuntimeError(
                    f"webtext pass '{step.name}' left unfinished shards; see {work / 'logs' / step.name}"
                )
            if step.name == "filter":
                check_not_empty(collect_stats(passes[:1], work), cfg)  # fail before the dedup passes


class _Stop(BaseException):
    """Raised by the signal handler; a BaseException so that datatrove's `except Exception` blocks let it through."""


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """SIGTERM/SIGUSR1 (a scheduler's pre-emption) stop the passes at once: unwinding shuts datatrove's helper
    processes down, finished shards keep their completion markers, and the CLI exits 143; a re-run resumes."""
    message = "finished web-text shards are kept. Run the same command to resume"
    if preemption_signalled():  # the signal came before this point (the CLI's handler only notes it); one process
        raise Preempted(f"stopped by a pre-emption signal; {message}")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked datatrove helper inherited this handler: die as the signal says
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    except _Stop as stop:
        raise Preempted(f"stopped by {stop}; {message}") from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_for_slurm(executors: list) -> None:
    """Block until the last pass finished every shard; stop when no job of the chain is left in the queue."""
    last = executors[-1]
    job_ids = [str(e.job_id) for e in executors if getattr(e, "job_id", None) not in (None, -1)]
    while last.get_incomplete_ranks(skip_completed=True):
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if job_ids and not queue.stdout.strip():
            raise UserError(
                f"the Slurm jobs {', '.join(job_ids)} ended before every web-text shard finished; see their logs under "
                f"{last.logging_dir.path}, then run the same command again (finished shards are skipped)"
            )
        logger.info("waiting for Slurm jobs %s", ", ".join(job_ids))
        time.sleep(60)


# --------------------------------------------------------------------------------------------------------------
# Counting


def shard_stats(work: Path, name: str) -> list[list[dict[str, Any]]]:
    """datatrove's per-shard stats of a pass (one list entry per pipeline step), finished shards only."""
    folder = work / "logs" / name / "stats"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _total(stats: list[list[dict[str, Any]]], index: int, key: str) -> int:
    value = 0
    for shard in stats:
        entry = shard[index]["stats"].get(key, 0)
        value += entry["total"] if isinstance(entry, dict) else entry
    return int(value)


def collect_stats(passes: list[Pass], work: Path) -> dict[str, Any]:
    """Documents and tokens in and out of every step (summed over shards), the split sizes, skipped records."""
    steps: list[dict[str, Any]] = []
    reader: dict[str, int] = {}
    output: dict[str, dict[str, int]] = {}
    for step in passes:
        stats = shard_stats(work, step.name)
        if step.name == "filter":
            reader = {key: _total(stats, 0, key) for key in ("corrupt_records", "non_html_responses")}
        for label, (step_i, tally_i) in step.tallies.items():
            entry: dict[str, Any] = {"step": label, "documents_in": None, "tokens_in": None}
            entry["documents_out"], entry["tokens_out"] = (
                _total(stats, tally_i, "documents"),
                _total(stats, tally_i, "tokens"),
            )
            if steps:
                entry["documents_in"], entry["tokens_in"] = steps[-1]["documents_out"], steps[-1]["tokens_out"]
                entry["removed"] = entry["documents_in"] - entry["documents_out"]
                keys = sorted({k for shard in stats for k in shard[step_i]["stats"]}) if step_i is not None else []
                reasons = {
                    k.removeprefix("dropped_"): _total(stats, step_i, k) for k in keys if k.startswith("dropped_")
                }
                reasons |= {
                    k: _total(stats, step_i, k) for k in ("timeout", "clean_error", "broken_process") if k in keys
                }
                if reasons:
                    entry["reasons"] = reasons
            steps.append(entry)
        if step.split_index is not None:
            i = step.split_index
            output = {
                s: {"documents": _total(stats, i, s), "tokens": _total(stats, i, f"{s}_tokens")}
                for s in ("train", "validation")
            }
    return {
        "token": "a whitespace-separated word of the document text (of the raw HTML for WARC input before extraction)",
        "corrupt_records_skipped": reader.get("corrupt_records", 0),
        "non_html_responses_skipped": reader.get("non_html_responses", 0),
        "steps": steps,
        "output": output,
    }


def check_not_empty(stats: dict[str, Any], cfg: PipelineConfig) -> None:
    """A corpus that filtering emptied is a UserError naming the steps that removed documents, and how to loosen."""
    steps = stats["steps"]
    if not steps or steps[-1]["documents_out"] > 0:
        return
    read = steps[0]["documents_out"]
    if read == 0:
        raise UserError(
            f"webtext: no documents could be read from {cfg.webtext.input} ({stats['corrupt_records_skipped']} corrupt "
            f"records and {stats['non_html_responses_skipped']} non-HTML responses skipped); check {LOOSEN['read']}"
        )
    removers = sorted((s for s in steps[1:] if s.get("removed")), key=lambda s: -s["removed"])
    worst = removers[0]["step"]
    raise UserError(
        f"webtext: filtering removed all {read} documents read ("
        + ", ".join(f"{s['step']} removed {s['removed']}" for s in removers)
        + f"); loosen {LOOSEN.get(worst, worst)}, or check webtext.input"
    )
