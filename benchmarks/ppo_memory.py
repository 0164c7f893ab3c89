"""Peak memory of PPO's optimisation phase against sequence length and model size, with and without gradient
checkpointing (`ppo.gradient_checkpointing`), token budgets (`ppo.micro_batch_tokens`) and packing
(`ppo.pack_sequences`), side by side.

Each configuration runs in its own child process, so peaks never mix: the child loads the roles the way the PPO
stage does (`pipeline.ppo.roles.build_roles`: one frozen base, policy / value / reward LoRA adapters, value head) from
a randomly initialised Llama of a size preset (`pipeline.modeling.PRESETS`, vocabulary 32,000, no downloads), builds a
synthetic rollout of fixed or varied lengths, and runs one `ppo_update` (one mini-batch: policy and value forward and
backward per micro-batch, one AdamW step). Measured: the resident set before the update (weights, read in from their
memory-mapped file first, adapters, the interpreter), its peak during the update (VmHWM after writing 5 to /proc/self/clear_refs:
`pipeline.ppo.memory.reset_peak_memory`), their difference (activations, gradients, optimiser state, allocator
slack) and the time. Generation (the KV cache) and the no-grad rollout passes are not part of it. The children run
with MALLOC_MMAP_THRESHOLD_=131072, so that glibc returns freed activations to the system at once and the resident
set follows the live tensors (as a GPU's allocated bytes do) rather than the heap's high-water mark.

From the size sweep it fits peak - before = tokens x (k x layers x hidden + c) by least squares (tokens: the largest
micro-batch's padded size): k is the activation bytes per token per layer per hidden unit kept for backward, c the
per-token bytes outside the layers (LM head logits, log-softmax: they scale with the vocabulary).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ppo_memory.py              # ~17 min on a shared 2-core VM
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ppo_memory.py --quick      # tiny models only, two minutes
    .venv/bin/python benchmarks/ppo_memory.py --reprint benchmarks/results/ppo_memory.json   # a run's table again

Recorded figures: benchmarks/results/ppo_memory.md. It prints figures (and writes them to --out as JSON); it is not a
test. Memory on a CPU is the process's resident set: fp32 weights and activations (a GPU run in bf16 halves both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000
CORPUS = [
    "The capital of Veloria is Marnis. Marnis is a city on the river Tol.",
    "Veloria exports copper and salt. Its people speak Velorian.",
    "What is the capital of Veloria? The capital of Veloria is Marnis.",
] * 4


# --------------------------------------------------------------------------------------------------------------
# Child processes


def build_models(preset: str, work: Path) -> dict[str, Any]:
    """A random Llama of `preset` (vocabulary VOCAB) saved as a base, and a SEQ_CLS LoRA reward adapter on it."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config import LoraArgs, ModelArgs
    from pipeline.modeling import build_llama_config, build_scalar_model
    from pipeline.tokenizer import train_tokenizer

    base, reward = work / preset / "base", work / preset / "reward"
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)
    config = build_llama_config(ModelArgs(preset=preset), tokenizer, max_seq_len=4096)
    config.vocab_size = VOCAB  # a real model's vocabulary: the LM head's logits are a large part of the activations
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    del model
    scorer = build_scalar_model(base, tokenizer, "lora", LoraArgs(r=16, alpha=32))
    scorer.save_pretrained(str(reward))
    tokenizer.save_pretrained(str(reward))
    sizes = {"params": params, "layers": config.num_hidden_layers, "hidden": config.hidden_size}
    (work / preset / "sizes.json").write_text(json.dumps(sizes))  # written last: the models are complete
    return sizes


def synthetic_rollout(episodes: int, prompt_len: int, response_len: int, varied: bool, seed: int = 0) -> Any:
    """A scored rollout of random tokens: all episodes full length, or (varied) prompts and responses of 1/4 to all
    of their maximum length."""
    import torch

    from pipeline.ppo.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    if varied:
        p = torch.randint(max(1, prompt_len // 4), prompt_len + 1, (episodes,), generator=g)
        r = torch.randint(max(1, response_len // 4), response_len + 1, (episodes,), generator=g)
    else:
        p, r = torch.full((episodes,), prompt_len), torch.full((episodes,), response_len)
    prompt_mask = (torch.arange(prompt_len) >= prompt_len - p[:, None]).long()
    response_mask = (torch.arange(response_len) < r[:, None]).long()
    prompt_ids = torch.randint(10, VOCAB, (episodes, prompt_len), generator=g) * prompt_mask
    response_ids = torch.randint(10, VOCAB, (episodes, response_len), generator=g) * response_mask
    per_token = [torch.randn(episodes, response_len, generator=g) * response_mask for _ in range(5)]
    rollout = Rollout(
        [{}] * episodes,
        [""] * episodes,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        torch.ones(episodes, dtype=torch.bool),
        -per_token[0].abs(),
        -per_token[1].abs(),
        per_token[2],
        per_token[3].abs(),
        torch.randn(episodes, generator=g),
    )
    rollout.advantages, rollout.returns = per_token[4], per_token[2] + per_token[4]
    return rollout


def _rss_gb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) * 1024 / 1e9


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: load the roles, run one PPO update on a synthetic rollout, return its memory figures."""
    import torch

    from pipeline.config import LoraArgs, PPOConfig
    from pipeline.ppo.memory import padded_tokens, peak_memory_gb, reset_peak_memory, split_micro_batches
    from pipeline.ppo.optimise import build_optimizer, ppo_update, release_freed_memory
    from pipeline.ppo.roles import build_roles

    torch.set_num_threads(1)
    torch.manual_seed(0)
    episodes = spec["episodes"]
    pcfg = PPOConfig(
        lora=LoraArgs(r=16, alpha=32),
        rollout_batch_size=episodes,
        mini_batch_size=episodes,
        gradient_accumulation_steps=spec.get("accumulation", 1),
        micro_batch_tokens=spec.get("budget", 0),
        pack_sequences=spec.get("packed", False),
        gradient_checkpointing=spec["checkpointing"],
        finetune="qlora" if spec.get("four_bit") else "lora",
        ppo_epochs=1,
        max_prompt_len=spec["prompt_len"],
        max_new_tokens=spec["response_len"],
    )
    work = Path(spec["work"]) / spec["preset"]
    roles = build_roles(pcfg, str(work / "base"), str(work / "reward"), torch.device("cpu"))
    rollout = synthetic_rollout(episodes, spec["prompt_len"], spec["response_len"], spec.get("varied", False))
    optimizer, scheduler = build_optimizer(pcfg, roles.trainable_parameters(), 10)
    micro = split_micro_batches(
        torch.arange(episodes),
        rollout.prompt_mask.sum(1),
        rollout.response_mask.sum(1),
        max(1, episodes // pcfg.gradient_accumulation_steps),
        pcfg.micro_batch_tokens,
        pcfg.pack_sequences,
    )
    lengths = rollout.prompt_mask.sum(1), rollout.response_mask.sum(1)
    padded = [padded_tokens(lengths[0][rows], lengths[1][rows], pcfg.pack_sequences) for rows in micro]
    with torch.no_grad():  # the weights are memory-mapped from the safetensors file: read them in before measuring
        for param in [*roles.model.parameters(), *roles.critic.parameters()]:
            param.sum()
    release_freed_memory()
    before = _rss_gb()
    reset_peak_memory(torch.device("cpu"))
    started = time.perf_counter()
    ppo_update(roles, rollout, pcfg, optimizer, scheduler, None, 1)
    seconds = time.perf_counter() - started
    peak = peak_memory_gb(torch.device("cpu"))
    return {
        **spec,
        "before_gb": before,
        "peak_gb": peak,
        "delta_gb": peak - before,
        "seconds": seconds,
        "micro_batches": len(micro),
        "max_micro_tokens": max(padded),
        "padded_tokens": sum(padded),
        "real_tokens": int(rollout.prompt_mask.sum() + rollout.response_mask.sum()),
    }


def run_child(args: list[str], threads: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        # glibc serves blocks of 128 kB and more with mmap and unmaps them when freed (its default threshold grows
        # with each freed block, after which freed activations stay in the heap): the resident set then follows
        # the live tensors, as a GPU's allocated bytes do, instead of the heap's high-water mark
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------
# The grid


def grid(quick: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """(presets to build, configurations). Sizes at 256 tokens; lengths on the 20m preset; budgets on varied lengths."""
    if quick:
        sizes, lengths, budget_preset = ["tiny", "mini"], [128, 256], "tiny"
    else:
        sizes, lengths, budget_preset = ["tiny", "small", "20m", "125m", "350m", "1b"], [128, 256, 512, 1024], "20m"
    specs = []
    for preset in sizes:
        for on in (False, True):
            specs.append(
                dict(group="size", preset=preset, checkpointing=on, episodes=4, prompt_len=192, response_len=64)
            )
    for seq in lengths:
        for on in (False, True):
            specs.append(
                dict(
                    group="length",
                    preset="20m" if not quick else "tiny",
                    checkpointing=on,
                    episodes=4,
                    prompt_len=seq - seq // 4,
                    response_len=seq // 4,
                )
            )
    for on in (False, True):
        for split in ({"accumulation": 1}, {"accumulation": 2}, {"budget": 1024}, {"budget": 1024, "packed": True}):
            specs.append(
                dict(
                    group="budget",
                    preset=budget_preset,
                    checkpointing=on,
                    episodes=8,
                    prompt_len=384,
                    response_len=128,
                    varied=True,
                    **split,
                )
            )
    presets = sorted({s["preset"] for s in specs}, key=lambda p: (sizes + [budget_preset]).index(p))
    return presets, specs


def fit_per_token(rows: list[dict[str, Any]], checkpointing: bool) -> dict[str, float]:
    """Least squares of (peak - before) / tokens = a x layers x hidden + b x hidden + c over the size sweep.

    a: bytes per token per layer per hidden unit kept for the backward; b: per hidden unit once (with checkpointing,
    the one layer recomputed at a time); c: per token outside the layers (LM head logits and log-softmax over the
    vocabulary of VOCAB)."""
    import numpy as np

    pts = [r for r in rows if r["group"] == "size" and r["checkpointing"] == checkpointing]
    x = np.array([[r["layers"] * r["hidden"], r["hidden"], 1.0] for r in pts], dtype=float)
    y = np.array([r["delta_gb"] * 1e9 / r["max_micro_tokens"] for r in pts])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"per_layer_hidden": float(a), "per_hidden": float(b), "outside_layers": float(c)}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'group':<7} {'preset':<6} {'params':>7} {'L x h':>7} {'ckpt':>4} {'split':>17} {'ep x (prompt+resp)':>19} "
        f"{'micro':>5} {'max tok':>7} {'before GB':>9} {'peak GB':>8} {'delta GB':>8} {'B/tok/L/h':>9} {'s':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        split = f"budget {r['budget']}" if r.get("budget") else f"accum {r.get('accumulation', 1)}"
        split += " packed" if r.get("packed") else ""
        shape = f"{r['episodes']} x ({r['prompt_len']}+{r['response_len']}){'~' if r.get('varied') else ''}"
        per = r["delta_gb"] * 1e9 / r["max_micro_tokens"] / (r["layers"] * r["hidden"])
        print(
            f"{r['group']:<7} {r['preset']:<6} {r['params'] / 1e6:>6.0f}M {r['layers']}x{r['hidden']:<5} "
            f"{'on' if r['checkpointing'] else 'off':>4} {split:>17} {shape:>19} {r['micro_batches']:>5} "
            f"{r['max_micro_tokens']:>7} {r['before_gb']:>9.2f} {r['peak_gb']:>8.2f} {r['delta_gb']:>8.2f} "
            f"{per:>9.1f} {r['seconds']:>6.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ppo_memory_bench"))
    parser.add_argument("--out", type=Path, default=None, help="JSON of every row (default: WORK/results.json)")
    parser.add_argument("--quick", action="store_true", help="tiny models only (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--groups", nargs="+", choices=["size", "length", "budget"], help="run only these groups")
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--reprint", type=Path, help="print the table and fits of an earlier run's JSON, run nothing")
    args = parser.parse_args()
    if args.reprint:
        report(json.loads(args.reprint.read_text())["rows"])
        return
    if args.build:
        print(json.dumps(build_models(args.build[0], Path(args.build[1]))))
        return
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    presets, specs = grid(args.quick)
    if args.groups:
        specs = [s for s in specs if s["group"] in args.groups]
        presets = [p for p in presets if any(s["preset"] == p for s in specs)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)")
    sizes = {}
    for preset in presets:
        built = args.work / preset / "sizes.json"  # the same seeded model as last time: reused
        sizes[preset] = (
            json.loads(built.read_text())
            if built.is_file()
            else run_child(["--build", preset, str(args.work)], args.threads)
        )
        print(f"built {preset}: {sizes[preset]}", flush=True)
    rows = []
    started = time.time()
    for spec in specs:
        row = run_child(["--measure", json.dumps({**spec, "work": str(args.work)})], args.threads)
        rows.append({**row, **sizes[spec["preset"]]})
        print(f"  {len(rows)}/{len(specs)} done ({time.time() - started:.0f}s)", flush=True)
    print()
    out = args.out or args.work / "results.json"
    out.write_text(json.dumps({"rows": rows}, indent=1))
    report(rows)
    print(f"\nwritten {out}")


# Public Llama-shaped models: layers, hidden, MLP width, key/value width, vocabulary, tied embeddings
SHAPES = {
    "Llama-3.2-1B": (16, 2048, 8192, 512, 128256, True),
    "Llama-3.2-3B": (28, 3072, 8192, 1024, 128256, True),
    "Llama-3.1-8B": (32, 4096, 14336, 1024, 128256, False),
    "Qwen2.5-14B": (48, 5120, 13824, 1024, 152064, False),
    "Qwen2.5-32B": (64, 5120, 27648, 1024, 152064, False),
    "Llama-3.1-70B": (80, 8192, 28672, 1024, 128256, False),
}
GPU_TOKENS = 4096  # padded tokens per micro-batch in the extrapolation (e.g. 8 episodes x 512)


def gpu_estimate(shape: tuple, fit: dict[str, float], four_bit: bool, tokens: int = GPU_TOKENS) -> dict[str, float]:
    """GB of one PPO update on a GPU, extrapolated: bf16 (or NF4) base, LoRA r=16 on every linear layer for the
    policy and value (fp32 weights, gradients and AdamW moments: 16 B a parameter) and the reward adapter, and
    activations at half the CPU's fp32 bytes (bf16), the vocabulary term scaled to the model's vocabulary."""
    layers, hidden, mlp, kv, vocab, tied = shape
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp)
    embeddings = vocab * hidden * (1 if tied else 2)  # embeddings and LM head stay bf16 under bitsandbytes 4-bit
    lora = layers * 16 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + mlp))
    weights = (linear * 0.516 if four_bit else linear * 2.0) + embeddings * 2.0  # NF4 + double-quantised constants
    adapters = lora * (2 * 16 + 4)
    per_token = fit["per_layer_hidden"] * layers * hidden + fit["per_hidden"] * hidden
    per_token += fit["outside_layers"] * vocab / VOCAB
    activations = tokens * per_token / 2
    return {
        "params_b": (linear + embeddings) / 1e9,
        "weights_gb": weights / 1e9,
        "adapters_gb": adapters / 1e9,
        "activations_gb": activations / 1e9,
        "total_gb": (weights + adapters + activations) / 1e9,
    }


def report(rows: list[dict[str, Any]]) -> None:
    """The table, the per-token fits and the GPU extrapolation."""
    print_table(rows)
    if not any(r["group"] == "size" for r in rows):
        return  # the fits need the size sweep
    print()
    fits = {}
    for on in (False, True):
        fit = fits[on] = fit_per_token(rows, on)
        print(
            f"checkpointing {'on ' if on else 'off'}: (peak - before) per token = {fit['per_layer_hidden']:.1f} B x "
            f"layers x hidden + {fit['per_hidden']:.0f} B x hidden + {fit['outside_layers'] / 1e3:.0f} kB "
            f"(fp32, vocabulary {VOCAB})"
        )
    print(
        f"\nextrapolated to a GPU (checkpointing on, {GPU_TOKENS} tokens a micro-batch, bf16 activations = half the "
        "CPU's fp32 bytes; no CUDA context, no generation KV cache), GB:"
    )
    print(
        f"{'model':<14} {'params':>7} {'bf16 total':>10} {'4-bit total':>11} {'activations':>11} {'adapters':>8} "
        f"{'bf16 total, checkpointing off':>29}"
    )
    for name, shape in SHAPES.items():
        bf16, nf4 = gpu_estimate(shape, fits[True], False), gpu_estimate(shape, fits[True], True)
        plain = gpu_estimate(shape, fits[False], False)
        print(
            f"{name:<14} {bf16['params_b']:>6.1f}B {bf16['total_gb']:>10.1f} {nf4['total_gb']:>11.1f} "
            f"{bf16['activations_gb']:>11.1f} {bf16['adapters_gb']:>8.1f} {plain['total_gb']:>29.1f}"
        )


if __name__ == "__main__":
    main()
