"""SFT fine-tuning modes side by side: samples/s and peak memory of LoRA, QLoRA (4-bit NF4 base) and full fine-tuning.

All three train the same model (a Llama size preset from the same seeded random weights, or `--base`) on the same
conversations with the same batch, sequence length and steps, through the stage's own path
(`pipeline.sft.load_tokenizer_and_model` + `build_trainer`, i.e. trl's SFTTrainer with assistant-only loss). Each mode
runs in a fresh child process, so peak memory is its own: peak resident memory (CPU) or peak allocated GPU memory,
and the growth over the memory held once the model is loaded (activations, gradients, optimiser state).
samples/s leaves out the first step (warm-up). It prints figures; it is not a test. Timings on a shared machine are
noisy: run it on a quiet one.

    .venv/bin/python benchmarks/sft_finetune_modes.py --preset mini --steps 12 --batch 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("lora", "qlora", "full")


def make_base(root: Path, preset: str, seq_len: int) -> Path:
    """A seeded random Llama of `preset` with a byte-level BPE trained on the benchmark's own text."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config import ModelArgs
    from pipeline.modeling import build_llama_config
    from pipeline.tokenizer import train_tokenizer

    texts = [" ".join(_sentence(random.Random(i)) for _ in range(6)) for i in range(2000)]
    tokenizer = train_tokenizer(texts, vocab_size=2048, min_frequency=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_llama_config(ModelArgs(preset=preset), tokenizer, max(seq_len, 256)))
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def make_conversations(root: Path, n: int, turns: int) -> Path:
    """`n` multi-turn conversations of invented sentences (long enough to fill --seq-len tokens)."""
    path = root / "conversations.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            rng = random.Random(10_000 + i)
            messages = []
            for _ in range(turns):
                messages.append({"role": "user", "content": _sentence(rng) + "?"})
                messages.append({"role": "assistant", "content": " ".join(_sentence(rng) + "." for _ in range(3))})
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def _sentence(rng: random.Random) -> str:
    words = ["capital", "river", "language", "export", "copper", "salt", "market", "city", "people", "speak", "trade"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(mode: str, base: Path, data: Path, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in `mode` in this process; return throughput and memory figures."""
    import torch
    import transformers

    from pipeline.config import load_config
    from pipeline.data.conversations import load_conversations
    from pipeline.sft import build_trainer, load_tokenizer_and_model
    from pipeline.tracking import count_parameters

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [
            f"run_dir={run_dir}", f"sft.finetune={mode}", f"sft.max_steps={args.steps}", "sft.save_steps=100000",
            f"sft.per_device_train_batch_size={args.batch}", f"sft.max_seq_len={args.seq_len}", "sft.report_to=none",
            "sft.logging_steps=100000", "sft.learning_rate=1e-4", "sft.warmup_ratio=0",
        ])  # fmt: skip
        tokenizer, model, _ = load_tokenizer_and_model(cfg, str(base))
        conversations, _ = load_conversations(data, tokenizer)
        trainer = build_trainer(cfg, model, tokenizer, conversations, None)
        clock = Clock()
        trainer.add_callback(clock)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        loaded_rss = _rss_mb()
        trainer.train()
        trainable, total = count_parameters(model)
    seconds = clock.times[-1] - clock.times[0]
    row = {
        "mode": mode,
        "trainable": trainable,
        "total": total,
        "samples_per_s": (len(clock.times) - 1) * args.batch / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded_rss,
    }
    if torch.cuda.is_available():
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu_growth_mb"] = row["peak_gpu_mb"] - loaded_gpu
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini", help="Llama size preset of pipeline/modeling.py (default mini)")
    parser.add_argument("--base", help="an existing causal LM (path or Hub id) instead of a random preset model")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "BASE", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, base, data = args.child
        print(json.dumps(measure(mode, Path(base), Path(data), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = Path(args.base) if args.base else make_base(root, args.preset, args.seq_len)
        data = make_conversations(root, args.conversations, turns=2)
        rows = []
        for mode in args.modes:
            command = [sys.executable, __file__, "--child", mode, str(base), str(data), "--steps", str(args.steps),
                       "--batch", str(args.batch), "--seq-len", str(args.seq_len)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"SFT modes on {args.base or 'preset ' + args.preset}: batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps (first one not timed), {device}")  # fmt: skip
    memory = "peak_gpu_mb" if "peak_gpu_mb" in rows[0] else "peak_rss_mb"
    growth = "gpu_growth_mb" if memory == "peak_gpu_mb" else "rss_growth_mb"
    header = f"{'mode':<6} {'trainable':>12} {'of total':>12} {'samples/s':>10} {memory:>13} {growth:>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['mode']:<6} {row['trainable']:>12,} {row['total']:>12,} {row['samples_per_s']:>10.2f} "
              f"{row[memory]:>13.0f} {row[growth]:>14.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
