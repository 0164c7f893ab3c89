"""The demo world's files under `run_dir/world/`, written once per seed and `world:` section.

    crawl/*.warc.gz          the crawl, Common-Crawl style (crawl.py); crawl_labels.jsonl its ground truth
    facts.json               the world itself
    sft_train.jsonl, sft_eval.jsonl          mixed-quality demonstrations
    heldout_qa.jsonl         questions about the held-out entities (their facts appear only in the crawl)
    reward_prompts.jsonl, reward_rankings.jsonl   prompts with templated responses ranked by the annotators
    ppo_train_prompts.jsonl, ppo_eval_prompts.jsonl

What each file holds: data_cards/demo-*.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

from filelock import FileLock

from pipeline.config import PipelineConfig, config_to_dict, hash_settings
from pipeline.data.records import write_jsonl
from pipeline.demo.annotators import build_rankings
from pipeline.demo.crawl import write_crawl
from pipeline.demo.world import build_demonstrations, build_heldout_questions, build_prompts, build_world

logger = logging.getLogger(__name__)


class WorldFiles:
    """Paths of the materialised world (see data_cards/demo-*.md for what each file holds)."""

    def __init__(self, root: Path):
        self.root = root
        self.crawl_dir = root / "crawl"  # CC-style WARC files
        self.crawl_labels = root / "crawl_labels.jsonl"  # ground truth per response record
        self.facts = root / "facts.json"  # the world itself
        self.sft_train = root / "sft_train.jsonl"
        self.sft_eval = root / "sft_eval.jsonl"
        self.heldout_qa = root / "heldout_qa.jsonl"
        self.reward_prompts = root / "reward_prompts.jsonl"
        self.reward_rankings = root / "reward_rankings.jsonl"
        self.ppo_train_prompts = root / "ppo_train_prompts.jsonl"
        self.ppo_eval_prompts = root / "ppo_eval_prompts.jsonl"


def world_hash(cfg: PipelineConfig) -> str:
    return hash_settings({"seed": cfg.seed, "world": config_to_dict(cfg.world)})


def materialize(cfg: PipelineConfig) -> WorldFiles:
    """Write the world's files under `run_dir/world/` unless they are already there for this seed and world.

    Safe to call from several processes at once (a file lock; files appear by one rename). A world made with other
    settings is moved aside, never deleted.
    """
    root = cfg.run_path / "world"
    files = WorldFiles(root)
    digest = world_hash(cfg)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.run_path / ".world.lock")):
        marker = root / "world.json"
        if marker.is_file():
            if json.loads(marker.read_text()).get("hash") == digest:
                return files
            aside = root.with_name(f"world.{json.loads(marker.read_text()).get('hash', 'old')}")
            if aside.exists():
                shutil.rmtree(aside)
            root.rename(aside)
            logger.info("the world settings changed; the previous world was moved to %s", aside)
        partial = root.with_name("world.partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        _write_world(cfg, WorldFiles(partial))
        (partial / "world.json").write_text(
            json.dumps({"hash": digest, "seed": cfg.seed, **config_to_dict(cfg.world)}, indent=2)
        )
        if root.exists():
            shutil.rmtree(root)  # a half-written world without world.json
        os.replace(partial, root)
    return files


def _write_world(cfg: PipelineConfig, files: WorldFiles) -> None:
    wc = cfg.world
    world = build_world(cfg)
    rng = random.Random(f"world-data-{cfg.seed}")
    files.facts.write_text(json.dumps(dataclasses.asdict(world), indent=1))
    stats = write_crawl(world, wc, files.crawl_dir, files.crawl_labels, random.Random(f"crawl-{cfg.seed}"))
    demos = build_demonstrations(world, wc, rng)
    n_eval = max(8, len(demos) // 10)
    write_jsonl(files.sft_train, demos[n_eval:])
    write_jsonl(files.sft_eval, demos[:n_eval])
    write_jsonl(files.heldout_qa, build_heldout_questions(world, rng))
    reward_prompts = build_prompts(world, world.train_entities, wc.n_reward_prompts, rng)
    write_jsonl(files.reward_prompts, reward_prompts)
    write_jsonl(files.reward_rankings, build_rankings(world, reward_prompts, wc, rng))
    write_jsonl(files.ppo_train_prompts, build_prompts(world, world.train_entities, 256, rng))
    write_jsonl(
        files.ppo_eval_prompts, build_prompts(world, world.heldout, wc.n_eval_prompts, rng, wc.eval_adversarial_share)
    )
    logger.info(
        "demo world: %d entities (%d held out), crawl of %d pages (%d junk), %d demonstrations",
        len(world.entities),
        len(world.heldout),
        stats["pages"],
        stats["junk"],
        len(demos),
    )
