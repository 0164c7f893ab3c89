"""Stage 1a, web text: extract, filter and deduplicate a crawl into parquet shards that `datasets` loads.

Reads WARC/WET files, jsonl/parquet files, a Hub dataset (streamed) or the demo world's crawl, and runs it through
datatrove (passes.py, with the offline-safe steps of filters.py): Trafilatura extraction, language ID, Gopher
repetition and quality, C4 quality, bad words, exact and MinHash near-duplicate removal, locally or through
datatrove's Slurm/Ray executors.

    run_dir/webtext/work/logs/<pass>/     datatrove completion markers (resume skips finished shards), stats, logs
    run_dir/webtext/work/<pass outputs>/  intermediate shards; work/removed/<step>/ holds removed documents
    run_dir/webtext/final/train/*.parquet, final/validation/*.parquet     columns text, id, url
    run_dir/webtext/final/stats.json      documents and tokens in and out of every step; corrupt records skipped
    run_dir/webtext/final/eval.json       demo only: the filter against the crawl's ground truth
    run_dir/webtext/final/stage.json

    rlhf webtext recipes/demo.yaml
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline import demo
from pipeline.checkpoints import (
    begin_stage,
    finishing,
    stage_dir,
    wait_for_final,
    write_json_atomic,
    write_stage_json,
)
from pipeline.config import PipelineConfig, WebtextConfig
from pipeline.errors import UserError
from pipeline.tracking import is_main_process
from pipeline.webtext.passes import (
    Source,
    build_passes,
    check_not_empty,
    check_settings,
    collect_stats,
    minhash_bands,
    run_passes,
)

logger = logging.getLogger(__name__)

STAGE = "webtext"
SUFFIXES = {
    "wet": (".wet", ".wet.gz"),  # tested first: CC names them .warc.wet.gz
    "warc": (".warc", ".warc.gz", ".arc.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".jsonl.zst"),
    "parquet": (".parquet",),
}


# --------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """role -> the corpus: 'demo', a Hub id, or local files with their count and size (so changed files show)."""
    if cfg.webtext.input is None:
        raise UserError(
            "webtext.input is not set: give WARC/WET/jsonl/parquet files (a path or glob), a Hub dataset id such as "
            "HuggingFaceFW/fineweb, or 'demo' (or set pretrain.dataset, or sft.base, so that this stage is not needed)"
        )
    check_settings(cfg.webtext)
    if cfg.webtext.input == demo.DEMO:
        return {"corpus": demo.DEMO}
    return {"corpus": resolve_source(cfg.webtext).description}


def resolve_source(webtext: WebtextConfig) -> Source:
    """Find the input files (or the Hub id) and their format; a missing path is a UserError."""
    pattern = os.path.expanduser(webtext.input)
    local = Path(pattern)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", pattern) and not local.exists()
    if webtext.input_format == "hub" or (webtext.input_format == "auto" and looks_like_hub_id):
        config = f":{webtext.hub_config}" if webtext.hub_config else ""
        return Source(
            "hub", f"hf://datasets/{webtext.input}{config}/{webtext.hub_split} (streamed)", hub_id=webtext.input
        )
    if glob.has_magic(pattern):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    elif local.is_dir():
        paths = sorted(
            p for p in local.rglob("*") if p.is_file() and (webtext.input_format != "auto" or _format_of(p))
        )
    elif local.is_file():
        paths = [local]
    else:
        raise UserError(
            f"webtext.input: {webtext.input} does not exist (give a file, directory or glob of WARC/WET/jsonl/parquet "
            "files, a Hub dataset id such as HuggingFaceFW/fineweb, or 'demo')"
        )
    if not paths:
        raise UserError(
            f"webtext.input: no WARC/WET/jsonl/parquet files match {webtext.input} (check the path or glob)"
        )
    fmt = webtext.input_format
    if fmt == "auto":
        found = {_format_of(p) for p in paths}
        if None in found or len(found) > 1:
            raise UserError(
                f"webtext.input: cannot tell the format of {webtext.input} from its file names; set webtext.input_format"
            )
        fmt = found.pop()
    folder = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    files = [str(p.resolve().relative_to(folder)) for p in paths]
    size = sum(p.stat().st_size for p in paths)
    return Source(fmt, f"{webtext.input} [{fmt}, {len(files)} files, {size} bytes]", str(folder), files)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if name.endswith(suffixes)), None)


def demo_source(cfg: PipelineConfig) -> tuple[Source, Path]:
    """The demo world's crawl (written once under run_dir/world/) and its ground-truth labels file."""
    folder, names, labels = demo.crawl_files(cfg)
    return Source("warc", f"demo crawl {folder}", str(folder), names), labels


# --------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, rerun: bool = False) -> Path:
    """Extract, filter and deduplicate the corpus into `run_dir/webtext/final/`; an interrupted run resumes.

    One process does the work: datatrove parallelises the stage itself (`webtext.tasks`, `webtext.workers`, or a
    Slurm/Ray executor). Launched with several processes (`rlhf run` under `accelerate launch`, a multi-node Slurm
    job), the main process runs it and the others wait for its `final/` (by the file, not a collective: the stage may
    take longer than a collective's timeout).
    """
    identity, done = begin_stage(cfg, STAGE, resolve_inputs(cfg), rerun)
    if done is not None:
        return done
    if not is_main_process():
        return wait_for_final(cfg, STAGE, identity)
    started = time.time()
    logger.info("webtext stage settings: %s", cfg.webtext)
    source, labels = demo_source(cfg) if cfg.webtext.input == demo.DEMO else (resolve_source(cfg.webtext), None)
    work = stage_dir(cfg, STAGE) / "work"
    passes = build_passes(cfg, source, work)
    run_passes(cfg, passes, work)
    stats = collect_stats(passes, work)
    check_not_empty(stats, cfg)
    bands, rows, effective = minhash_bands(cfg.webtext.minhash_threshold, cfg.webtext.minhash_buckets)
    stats["input"] = {"source": source.description, "format": source.format, "files": len(source.files)}
    stats["minhash"] = {
        "enabled": cfg.webtext.minhash_dedup,
        "bands": bands,
        "rows_per_band": rows,
        "effective_threshold": round(effective, 4),
    }
    with finishing(cfg, STAGE) as out:
        stats["output"] = assemble_splits(work / "output", out, cfg, stats["output"])
        write_json_atomic(out / "stats.json", stats)
        metrics: dict[str, Any] = {
            "documents_read": stats["steps"][0]["documents_out"],
            "documents_kept": stats["steps"][-1]["documents_out"],
            "tokens_kept": stats["steps"][-1]["tokens_out"],
            "corrupt_records_skipped": stats["corrupt_records_skipped"],
            "train_documents": stats["output"]["train"]["documents"],
            "validation_documents": stats["output"]["validation"]["documents"],
        }
        if labels is not None:
            report = demo.evaluate_crawl(labels, out, work / "removed")
            write_json_atomic(out / "eval.json", report)
            metrics["eval"] = {key: report[key] for key in ("filter", "keep_all", "clusters")}
        metrics["seconds"] = round(time.time() - started, 1)
        write_stage_json(out, identity, metrics, contents="parquet train/ and validation/ (text, id, url), stats.json")
    log_summary(stats, metrics)
    return stage_dir(cfg, STAGE) / "final"


def assemble_splits(source: Path, out: Path, cfg: PipelineConfig, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Hard-link (or copy) the parquet shards of work/output/<split>/ into final/<split>/.

    When no document's hash fell into `heldout_share` (a small corpus), the train document with the lowest hash goes
    to validation instead, so later stages always have a held-out split. `counts` (documents and tokens per split,
    from the split step's stats) comes back updated, with the number of files.
    """
    import pyarrow.parquet as pq

    from pipeline.webtext.filters import count_tokens, held_out_rank

    files = {split: sorted((source / split).glob("*.parquet")) for split in ("train", "validation")}
    rewritten: dict[Path, Any] = {}
    if cfg.webtext.heldout_share > 0 and counts["validation"]["documents"] == 0:
        ids = {f: pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in files["train"]}
        ranked = sorted(
            (held_out_rank(doc_id, cfg.seed), f, i) for f, column in ids.items() for i, doc_id in enumerate(column)
        )
        if len(ranked) < 2:
            raise UserError(
                f"webtext: {len(ranked)} document kept, too few for a train and a validation split; "
                "give more input or loosen the filters"
            )
        _, file, row = ranked[0]
        table = pq.read_table(file)
        moved = table.slice(row, 1)
        rewritten[file] = table.take([i for i in range(table.num_rows) if i != row])
        (out / "validation").mkdir(parents=True)
        pq.write_table(moved, out / "validation" / "moved_from_train.parquet")
        tokens = count_tokens(moved.column("text")[0].as_py())
        train = counts["train"]
        counts = {
            "train": {"documents": train["documents"] - 1, "tokens": train["tokens"] - tokens},
            "validation": {"documents": 1, "tokens": tokens},
        }
        logger.info(
            "no kept document fell into webtext.heldout_share; the one with the lowest hash went to validation"
        )
    for split, shards in files.items():
        for file in shards:
            target = out / split / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if file in rewritten:
                if rewritten[file].num_rows:
                    pq.write_table(rewritten[file], target)
                continue
            try:
                os.link(file, target)
            except OSError:
                shutil.copy2(file, target)
        counts[split]["files"] = len(list((out / split).glob("*.parquet")))
    return counts


def log_summary(stats: dict[str, Any], metrics: dict[str, Any]) -> None:
    for step in stats["steps"]:
        logger.info(
            "  %-18s %8s docs in %8d out  %10d tokens out",
            step["step"],
            step["documents_in"] or "-",
            step["documents_out"],
            step["tokens_out"],
        )
    if "eval" in metrics:
        f = metrics["eval"]["filter"]
        logger.info(
            "demo, junk as positive: precision %.3f recall %.3f F1 %.3f; keep-all F1 %.3f",
            f["precision"],
            f["recall"],
            f["f1"],
            metrics["eval"]["keep_all"]["f1"],
        )
