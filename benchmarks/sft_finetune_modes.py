"""SFT fine-tuning modes side by side: samples/s and peak memory of LoRA, QLoRA (4-bit NF4 base) and full fine-tuning.

All three train the same model (a Llama size preset from the same seeded random weights, or `--base`) on the same
conversations with the same batch, sequence length and steps, through the stage's own path
(`pipeline.sft.load_tokenizer_and_model` + `build_trainer`, i.e. trl's SFTTrainer with assistant-only loss). Each mode
runs in a fresh child process, so its memory is its own. On a CPU it reports resident memory: before training,
its peak while training (the high-water mark is reset through /proc/self/clear_refs once the model and trainer
are built) and the growth between them (gradients, optimiser state, activations), and the process's lifetime peak
(loading and 4-bit quantising included). Before measuring, weights still mapped from the safetensors file are
copied into ordinary memory (`materialise_weights`: mapped pages count only once touched, which hides frozen
weights and shows pages a 4-bit load has already quantised). On a GPU: peak allocated memory and its growth.
samples/s leaves out the first step (warm-up), and is given per CPU second of the process too (robust to other
processes sharing the core). Each mode runs `--rounds` times in turn; the fastest round counts, memory comes from
the first. It prints figures; it is not a test. Pin it to one core (the children inherit the pinning).

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/sft_finetune_modes.py --preset 20m --steps 12 --batch 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
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


def _reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM; Linux >= 4.0); False where it cannot.

    Freed heap memory is first handed back to the system (glibc `malloc_trim`): memory freed while loading would
    otherwise stay resident, count as "held before training" and be reused by the optimiser state unseen.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> tuple[float, float]:
    """(resident memory, of which file-backed) in MB: RssFile counts pages of memory-mapped files such as safetensors."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssFile:")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("RssFile", float("nan"))


def materialise_weights(model) -> None:
    """Copy every parameter that is still a view of the memory-mapped checkpoint into ordinary memory.

    transformers maps the safetensors file: its pages count as resident only once touched, so frozen full-precision
    weights would look free until training reads them, and the 4-bit load (which reads every page to quantise)
    would look as if it kept them. Copies make resident memory the weights the mode really holds. 4-bit weights
    (bitsandbytes `Params4bit`) are already copies.
    """
    for param in model.parameters():
        if type(param).__name__ != "Params4bit":
            param.data = param.data.clone()


def _peak_rss_mb() -> float:
    """VmHWM: the peak resident memory since the process started or since `_reset_peak_rss`."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, base: Path, data: Path, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in `mode` in this process; return throughput and memory figures."""
    import torch
    from step_clock import StepClock  # benchmarks/ is this script's directory

    from pipeline.config import load_config
    from pipeline.data.conversations import load_conversations
    from pipeline.sft import build_trainer, load_tokenizer_and_model
    from pipeline.tracking import count_parameters

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            None,
            [
                f"run_dir={run_dir}",
                f"sft.finetune={mode}",
                f"sft.max_steps={args.steps}",
                "sft.save_steps=100000",
                f"sft.per_device_train_batch_size={args.batch}",
                f"sft.max_seq_len={args.seq_len}",
                "sft.report_to=none",
                "sft.logging_steps=100000",
                "sft.learning_rate=1e-4",
                "sft.warmup_ratio=0",
            ],
        )
        tokenizer, model, _ = load_tokenizer_and_model(cfg, str(base))
        conversations, _ = load_conversations(data, tokenizer)
        trainer = build_trainer(cfg, model, tokenizer, conversations, None)
        clock = StepClock()
        trainer.add_callback(clock)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        lifetime_peak_before = _peak_rss_mb()
        materialise_weights(model)
        gc.collect()
        reset = _reset_peak_rss()
        loaded_rss, loaded_file = _rss_mb()
        trainer.train()
        train_peak = _peak_rss_mb()
        trainable, total = count_parameters(model)
        weights_mb = (
            sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
        )
    seconds = clock.times[-1] - clock.times[0]
    row = {
        "mode": mode,
        "trainable": trainable,
        "total": total,
        "samples_per_s": (len(clock.times) - 1) * args.batch / seconds,
        # CPU seconds of this process measure the same work undisturbed by other processes sharing the core
        "samples_per_cpu_s": (len(clock.times) - 1) * args.batch / (clock.cpu[-1] - clock.cpu[0]),
        "cpu_share": (clock.cpu[-1] - clock.cpu[0]) / seconds,  # below the thread count: other work took the core
        "weights_mb": weights_mb,
        "train_peak_rss_mb": train_peak if reset else float("nan"),
        "rss_before_mb": loaded_rss,
        "file_backed_mb": loaded_file,
        "rss_growth_mb": (train_peak if reset else float("nan")) - loaded_rss,
        "lifetime_peak_rss_mb": max(lifetime_peak_before, train_peak),
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
    parser.add_argument("--rounds", type=int, default=1, help="run the modes this many times, in turn; best of")
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
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for mode in args.modes:
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    str(base),
                    str(data),
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--seq-len",
                    str(args.seq_len),
                ]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(
                    f"  {mode}: {row['samples_per_s']:.2f} samples/s, {row['samples_per_cpu_s']:.2f} per CPU second, "
                    f"cpu busy {row['cpu_share']:.0%}, training peak RSS {row['train_peak_rss_mb']:.0f} MB "
                    f"(file-backed before training: {row['file_backed_mb']:.0f} MB)",
                    flush=True,
                )
                if mode not in best:  # memory from the first round; the fastest round for speed
                    best[mode] = row
                else:
                    if row["samples_per_s"] > best[mode]["samples_per_s"]:
                        best[mode].update({k: row[k] for k in ("samples_per_s", "cpu_share")})
                    best[mode]["samples_per_cpu_s"] = max(best[mode]["samples_per_cpu_s"], row["samples_per_cpu_s"])
        rows = list(best.values())

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"SFT modes on {args.base or 'preset ' + args.preset}: batch {args.batch} x {args.seq_len} tokens, "
        f"{args.steps} steps (first one not timed), {device}"
    )
    gpu = "peak_gpu_mb" in rows[0]
    columns = (
        ["peak_gpu_mb", "gpu_growth_mb"]
        if gpu
        else ["rss_before_mb", "train_peak_rss_mb", "rss_growth_mb", "lifetime_peak_rss_mb"]
    )
    header = (
        f"{'mode':<6} {'trainable':>11} {'of total':>11} {'weights MB':>10} {'samples/s':>10} {'vs full':>8} {'per CPU s':>9} {'vs full':>8} {'cpu':>5} "
        + " ".join(f"{c.removesuffix('_mb') + ' MB':>{len(c) + 1}}" for c in columns)
    )
    print(header)
    print("-" * len(header))
    full = next((r for r in rows if r["mode"] == "full"), None)
    for row in rows:
        speed = f"{row['samples_per_s'] / full['samples_per_s']:8.2f}" if full else f"{'':>8}"
        speed_cpu = f"{row['samples_per_cpu_s'] / full['samples_per_cpu_s']:8.2f}" if full else f"{'':>8}"
        print(
            f"{row['mode']:<6} {row['trainable']:>11,} {row['total']:>11,} {row['weights_mb']:>10.1f} "
            f"{row['samples_per_s']:>10.2f} {speed} {row['samples_per_cpu_s']:>9.2f} {speed_cpu} {row['cpu_share']:>5.0%} "
            + " ".join(f"{row[c]:>{len(c) + 1}.0f}" for c in columns)
        )
    print("of total: parameters as stored (a 4-bit weight packs two values per element); weights MB: parameters and")
    print("buffers. rss_before: resident memory once model and trainer are built (weights copied out of the mapped")
    print("checkpoint); train_peak_rss: peak resident memory while training; rss_growth: the difference (gradients,")
    print(
        "optimiser state, activations); lifetime_peak_rss: the process's peak, loading (and 4-bit quantising) included."
    )
    print("per CPU s: samples per CPU second of the process (robust to other processes time-sharing the core); cpu:")
    print("CPU time over wall time while training (below 100% per thread: other work shared the core).")


if __name__ == "__main__":
    main()
