"""What one PPO update costs in our loop, configuration against configuration, side by side in one run.

Each configuration runs in its own process (one after the other, pinned by the caller to one core), on the same
randomly initialised Llama, reward adapter, prompts and sizes: a warm-up update, then --updates timed updates
(rollout + optimisation). Printed per configuration: CPU seconds per update split into generation, scoring
(the no-grad forwards: reference, value, reward) and optimisation, episodes per CPU-second, the peak RSS of the
process, and the ratio to the first configuration; the configurations alternate over --repeats rounds so that a
drift of the machine hits all of them alike.

A configuration is NAME:key=value,key=value with ppo settings (advantage, samples_per_prompt, critic,
mixed_precision, rollout_logprobs, ...) and two switches for before/after measurements of the loop itself:
`lean=0` runs peft's own LoRA forward instead of pipeline/ppo/lean_lora.py's, `trim=backward` returns freed memory
to the OS after every backward (as the loop did before) instead of once per update.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/ppo_step.py \\
        --config before:lean=0,trim=backward --config after: --config bf16:mixed_precision=bf16 \\
        --config trunk:critic=trunk --config rloo:advantage=rloo,samples_per_prompt=4

Recorded figures: benchmarks/results/ppo_step.md. It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """NAME:key=value,... -> (name, settings) with values read as YAML."""
    import yaml

    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config {text!r}: {item!r} is not key=value")
        settings[key] = yaml.safe_load(value)
    return name, settings


def build_models(work: Path, hidden: int, layers: int, seed: int) -> tuple[Path, Path]:
    """A random Llama of the given shape with a tokenizer trained on a small synthetic corpus, and a LoRA reward
    adapter (random score head and B) on it, saved as the SFT stage and the reward stage would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from pipeline.tokenizer import train_tokenizer

    base, reward = work / "base", work / "reward"
    if (reward / "reward_stats.json").is_file():
        return base, reward
    words = "the river city salt copper help please thank you question answer north south trade".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(400)]
    tokenizer = train_tokenizer(corpus, vocab_size=2000, min_frequency=2)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    (reward / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return base, reward


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: warm-up update, then timed updates; CPU seconds per part and the peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    from pipeline.config import LoraArgs, PPOConfig
    from pipeline.generation import SamplingArgs, tokenize_prompts
    from pipeline.ppo import optimise
    from pipeline.ppo.optimise import build_optimizer, ppo_update
    from pipeline.ppo.roles import build_roles
    from pipeline.ppo.rollout import PromptSet, collect_rollout, normalize_scores, score_rollout

    settings = dict(spec["settings"])
    lean = bool(settings.pop("lean", 1))
    trim = settings.pop("trim", "update")
    pcfg = PPOConfig(
        lora=LoraArgs(r=8, alpha=16),
        rollout_batch_size=spec["rollout"],
        mini_batch_size=spec["mini_batch"],
        ppo_epochs=spec["epochs"],
        max_new_tokens=spec["new_tokens"],
        generation_batch_size=spec["rollout"],
        forward_batch_size=spec["rollout"],
        **settings,
    )
    roles = build_roles(pcfg, spec["base"], spec["reward"], torch.device("cpu"))
    if not lean:  # peft's own forward on every LoRA layer
        for module in roles.model.modules():
            if hasattr(module, "_peft_forward"):
                module.forward = module._peft_forward
    if trim == "backward":  # the loop before: malloc_trim after every backward
        backward = torch.Tensor.backward

        def backward_and_trim(self, *args, **kwargs):
            backward(self, *args, **kwargs)
            optimise.release_freed_memory()

        torch.Tensor.backward = backward_and_trim
    texts = [f"Question {i}: tell me about the river, the city and the salt trade" for i in range(64)]
    prompts = PromptSet([{"prompt": t} for t in texts], tokenize_prompts(roles.tokenizer, texts))
    optimizer, scheduler = build_optimizer(pcfg, roles.policy_parameters(), roles.critic_parameters(), 1000)
    sampling = SamplingArgs(spec["new_tokens"], 1.0)
    k = pcfg.samples_per_prompt

    def update(n: int) -> dict[str, float]:
        indices = [(n * pcfg.rollout_batch_size // k + i) % len(texts) for i in range(pcfg.rollout_batch_size // k)]
        indices = [i for i in indices for _ in range(k)]
        c0, w0 = time.process_time(), time.perf_counter()
        rollout = collect_rollout(roles, prompts, indices, sampling, pcfg, torch.device("cpu"))
        c1 = time.process_time()
        normalized = normalize_scores(rollout.scores, pcfg, roles.reward_stats, None)
        score_rollout(rollout, normalized, 0.05, pcfg)
        ppo_update(roles, rollout, pcfg, optimizer, scheduler, None, 1)
        c2, w2 = time.process_time(), time.perf_counter()
        share = rollout.timings["time_generate"] / max(
            rollout.timings["time_generate"] + rollout.timings["time_score"], 1e-9
        )
        return {
            "cpu_generate": (c1 - c0) * share,
            "cpu_score": (c1 - c0) * (1 - share),
            "cpu_optimise": c2 - c1,
            "cpu": c2 - c0,
            "wall": w2 - w0,
            "tokens": float(rollout.response_mask.sum()),
        }

    torch.manual_seed(spec["seed"])
    update(0)  # warm-up
    timed = [update(n + 1) for n in range(spec["updates"])]
    out = {key: sum(t[key] for t in timed) / len(timed) for key in timed[0]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["episodes"] = pcfg.rollout_batch_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="NAME:key=value,... (repeat; first = baseline)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rollout", type=int, default=16, help="episodes per update")
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--updates", type=int, default=2, help="timed updates per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-ppo-step")
    parser.add_argument("--out", type=Path, help="results JSON (default WORK_DIR/results.json)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child.read_text())
        args.child.with_suffix(".out.json").write_text(json.dumps(child(spec)))
        return
    configs = [parse_config(c) for c in args.config] or [parse_config("ours:")]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    base, reward = build_models(args.work_dir / "models", args.hidden, args.layers, args.seed)
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; torch "
        f"{torch.__version__}; {args.threads} thread(s) per process; configurations alternate over {args.repeats} "
        "rounds"
    )
    print(
        f"model: random Llama, hidden {config.hidden_size}, {config.num_hidden_layers} layers, MLP "
        f"{config.intermediate_size}, vocab {config.vocab_size}; rollout {args.rollout} episodes, mini-batch "
        f"{args.mini_batch}, {args.epochs} PPO epochs, responses <= {args.new_tokens} tokens, LoRA r 8 all-linear; "
        f"{args.updates} timed updates per process after a warm-up"
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for round_no in range(args.repeats):
        for name, settings in configs:
            spec = {
                "settings": settings,
                "base": str(base),
                "reward": str(reward),
                "threads": args.threads,
                "rollout": args.rollout,
                "mini_batch": args.mini_batch,
                "epochs": args.epochs,
                "new_tokens": args.new_tokens,
                "updates": args.updates,
                "seed": args.seed,
            }
            path = args.work_dir / f"{name}-{round_no}.json"
            path.write_text(json.dumps(spec))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            result = json.loads(path.with_suffix(".out.json").read_text())
            runs[name].append(result)
            print(
                f"[round {round_no}] {name}: {result['cpu']:.2f} CPU s/update (generate {result['cpu_generate']:.2f}, "
                f"score {result['cpu_score']:.2f}, optimise {result['cpu_optimise']:.2f}), peak RSS "
                f"{result['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in runs[name]) / len(runs[name])

    first = configs[0][0]
    header = f"{'configuration':<16}{'CPU s/update':>13}{'generate':>10}{'score':>8}{'optimise':>10}"
    header += f"{'episodes/CPU-s':>16}{'vs ' + first:>12}{'peak RSS MB':>13}"
    print("\n" + header)
    for name, _ in configs:
        cpu = mean(name, "cpu")
        print(
            f"{name:<16}{cpu:>13.2f}{mean(name, 'cpu_generate'):>10.2f}{mean(name, 'cpu_score'):>8.2f}"
            f"{mean(name, 'cpu_optimise'):>10.2f}{mean(name, 'episodes') / cpu:>16.3f}"
            f"{mean(first, 'cpu') / cpu:>11.2f}x{mean(name, 'peak_rss_mb'):>13.0f}"
        )
    for name, settings in configs:
        print(f"  {name}: {settings or 'defaults'}")
    out = args.out or args.work_dir / "results.json"
    out.write_text(json.dumps({"args": vars(args), "configs": dict(configs), "runs": runs}, indent=1, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
