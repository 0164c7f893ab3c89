"""Where a demo reward model goes wrong: held-out pairs grouped by the gold faults that tell the two responses apart.

For every strictly ordered pair of the reward stage's test split (noise-free gold ranking), the pair's group is the
set of the gold judge's faults (wrong, rude, insulting, impolite, off_topic) that one response has and the other has
not; each group gets its size, the reward model's pairwise accuracy and the keyword rule's. With --show GROUP it also
prints the pairs of that group the reward model gets wrong.

    .venv/bin/python benchmarks/reward_errors.py runs/demo
    .venv/bin/python benchmarks/reward_errors.py runs/demo --show impolite+rude+wrong
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data.rankings import LABELS
from pipeline.data.records import read_jsonl
from pipeline.demo import keywords
from pipeline.demo.gold import GoldScorer
from pipeline.demo.world import build_world
from pipeline.modeling import load_reward_model, reward_scores
from pipeline.reward.evaluation import keyword_score


def positions(ranking: str) -> dict[int, int]:
    """Response index -> its group's position in "C > A = D > B" (0 is best)."""
    return {
        LABELS.index(label.strip()): pos
        for pos, group in enumerate(ranking.split(" > "))
        for label in group.split(" = ")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--show", help="print the reward model's wrong pairs of this group (faults joined by +)")
    parser.add_argument("--min-pairs", type=int, default=5)
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="comparisons read")
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    model, tokenizer = load_reward_model(args.run_dir / "reward" / "final")
    gold = GoldScorer(build_world(cfg))
    polite, rude = keywords()
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for record in read_jsonl(args.run_dir / "reward" / "comparisons" / f"{args.split}.jsonl"):
        prompt, responses = record["prompt"], record["responses"]
        question = prompt[-1]["content"]
        rm = reward_scores(model, tokenizer, [prompt] * len(responses), responses, cfg.reward.max_seq_len).tolist()
        kw = [keyword_score(r, polite, rude) for r in responses]
        judged = [gold.judge(question, r) for r in responses]
        rank = positions(record["gold_ranking"])
        for i in range(len(responses)):
            for j in range(len(responses)):
                if rank[i] >= rank[j]:
                    continue
                faults = (judged[i].faults ^ judged[j].faults) - {"dispreferred"}
                name = "+".join(sorted(faults)) or "other"
                group = groups[(record["source"], name)]
                group[0] += 1
                group[1] += rm[i] > rm[j]
                group[2] += kw[i] > kw[j]
                if name == args.show and rm[i] <= rm[j]:
                    print(f"{record['source']} | {question} | better: {responses[i]} [gold {judged[i].score}, "
                          f"rm {rm[i]:.2f}] | worse: {responses[j]} [gold {judged[j].score}, rm {rm[j]:.2f}]")  # fmt: skip
    print(f"{'source':10s} {'faults that differ':36s} {'pairs':>5s} {'reward':>7s} {'keyword':>7s}")
    for (source, name), (n, right, kw_right) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        if n >= args.min_pairs:
            print(f"{source:10s} {name:36s} {n:5d} {right / n:7.2f} {kw_right / n:7.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
