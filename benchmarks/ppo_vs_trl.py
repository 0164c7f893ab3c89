"""Our PPO stage against trl 1.12.0's `trl.experimental.ppo.PPOTrainer` (the last trl with PPO), side by side.

Each side trains in its own process, one after the other (never at once): ours is `python -m pipeline ppo RECIPE`
in the project's environment; trl runs benchmarks/ppo_trl_side.py in its own virtual environment
(benchmarks/.venv-trl112: trl 1.12.0 beside the project's torch, transformers, peft and accelerate versions,
installed from PyPI on the first run and reused afterwards). Two phases:

- speed: a randomly initialised Llama of >= 50M parameters (default: the 125m preset, 12 layers, ~86M parameters
  with the demo tokenizer); a LoRA reward adapter on it (random score head), fixed KL coefficient on both sides.
  Measured: episodes per second over the updates after the first (warm-up excluded on both sides; taken when our
  update's record is logged and at trl's on_step_end), the same per CPU-second of the process (steadier on a shared
  machine), and the peak RSS of each process (os.wait4, whole process, imports included).
- gold: the demo run's own models (sft/final/merged, reward/final) and its PPO settings (the run's config.yaml),
  trained --gold-seeds times per side (ppo.seed_offset 0, 1, ..., or from --first-seed); every trained policy is then evaluated by our
  stage's evaluation code (pipeline/ppo/evaluation.py) on the world's held-out PPO prompts, each sampled
  --eval-samples times with the same random stream: gold score gained over the SFT policy, KL to the reference (the
  same k1 sum per response for both), gold win rate, insult rate; means over seeds and their standard error.

Like with like: same base, reward model, prompts (the same token ids), LoRA settings and PPO settings (rollout
batch, mini-batch, PPO epochs, response length, temperature, learning rate and schedule, AdamW eps, KL estimator,
EOS penalty, whitening, GAE, clip ranges, value coefficient); the reward model's score is normalised with the reward
stage's reward_stats.json on both sides (trl's score head is rescaled). What trl 1.12 cannot do is listed in the
printed settings: it has only a fixed KL coefficient (ours adapts it towards ppo.kl_target; trl gets the fixed
--trl-kl-coef, by default our initial coefficient), no gradient clipping, and the value model is a full copy of the
reward model trained in full (as in trl's example), where ours is a LoRA adapter on the shared base whose head starts
as the reward head divided by the reward_stats std (trl's value model starts on the raw score scale, as its example
sets it up). Smaller differences of trl 1.12 itself: its score lands one token after EOS (ours: on EOS), its reward
model reads the sampled ids (ours: the re-tokenised text + EOS, as the reward stage trained), its learning rate steps
once per update (ours: per optimiser step), and its old log-probs come from generate's logits (ours: a forward pass).

    .venv/bin/rlhf run recipes/demo.yaml --until reward          # the gold phase's models, prompts and settings
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/ppo_vs_trl.py --run-dir runs/demo
    .venv/bin/python benchmarks/ppo_vs_trl.py --run-dir runs/demo --phases speed --layers 8   # ~58M, quicker

The run dir may be a copy of a run (its reward adapter is then re-pointed at the copy's SFT model). Recorded
figures: benchmarks/results/ppo_vs_trl.md.

It prints figures (and writes them to --out, default WORK_DIR/results.json); it is not a test. Timings are noisy on
a shared machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.12.0"
SHARED_PACKAGES = ("torch", "transformers", "peft", "accelerate")  # pinned to the versions the project runs


# --------------------------------------------------------------------------------------------------------------
# trl's environment


def trl_environment(venv: Path) -> Path:
    """The python of a virtual environment with trl 1.12.0 and the project's versions of the shared packages."""
    pins = [f"trl=={TRL_VERSION}"] + [f"{name}=={version(name).split('+')[0]}" for name in SHARED_PACKAGES]
    python, marker = venv / "bin" / "python", venv / ".benchmark-pins"
    if python.is_file() and marker.is_file() and marker.read_text().split() == pins:
        return python
    print(f"installing {' '.join(pins)} into {venv} (once)", flush=True)
    subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    marker.write_text("\n".join(pins) + "\n")
    return python


# --------------------------------------------------------------------------------------------------------------
# Inputs


def load_run(run_dir: Path, work: Path):
    """The demo run's config (run_dir pointed at where it is now) and the paths of its models and prompts.

    The reward adapter records its base as a path inside the run as it was made (e.g. runs/demo/sft/final/merged);
    for a run copied elsewhere, the benchmark uses a copy of the adapter whose recorded base is the run's own.
    """
    from pipeline import demo
    from pipeline.config import load_config

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise SystemExit(
            f"{config} not found: give --run-dir a run made by `rlhf run recipes/demo.yaml --until reward`"
        )
    made_in = Path(load_config(config).run_dir)
    cfg = load_config(config, [f"run_dir={run_dir}"])
    world = demo.WorldFiles(run_dir / "world")
    paths = {
        "base": run_dir / "sft" / "final" / "merged",
        "reward": run_dir / "reward" / "final",
        "train_prompts": world.ppo_train_prompts,
        "eval_prompts": world.ppo_eval_prompts,
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"the run {run_dir} lacks {', '.join(missing)}: finish its sft and reward stages first")
    paths["reward"] = relocate_adapter(paths["reward"], made_in, run_dir, work / "reward_adapter")
    return cfg, paths


def relocate_adapter(adapter: Path, made_in: Path, run_dir: Path, out: Path) -> Path:
    """`adapter`, or a copy of it whose recorded base path (under the run dir it was made in) points into run_dir."""

    def moved(path: str | None) -> str | None:
        if path is None:
            return None
        recorded = Path(path)
        for old in (made_in, (ROOT / made_in).resolve()):
            if recorded.is_relative_to(old):
                return str(run_dir / recorded.relative_to(old))
        return path

    stage = json.loads((adapter / "stage.json").read_text()) if (adapter / "stage.json").is_file() else {}
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = stage.get("inputs", {}).get("base", {}).get("path")
    if moved(base) == base and moved(config.get("base_model_name_or_path")) == config.get("base_model_name_or_path"):
        return adapter
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(adapter, out)
    if base is not None:
        stage["inputs"]["base"]["path"] = moved(base)
        (out / "stage.json").write_text(json.dumps(stage, indent=1))
    config["base_model_name_or_path"] = moved(config.get("base_model_name_or_path"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def write_prompt_ids(source: Path, tokenizer: Any, pcfg: Any, out: Path) -> int:
    """The prompts as our stage tokenizes them (chat template, long-prompt policy), one {"input_ids"} per line."""
    from pipeline.data.prompts import read_prompts
    from pipeline.ppo.rollout import prepare_prompts

    records, _ = read_prompts(source, str(source))
    prompts = prepare_prompts(records, tokenizer, pcfg.max_prompt_len, pcfg.long_prompts, str(source))
    out.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in prompts.ids))
    return len(prompts.ids)


def merge_reward(adapter: Path, out: Path) -> None:
    """The reward adapter merged into its base: the full sequence-classification model trl is given."""
    from pipeline.modeling import load_reward_model

    model, tokenizer = load_reward_model(adapter)
    model.merge_and_unload().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def build_speed_models(args: argparse.Namespace, tokenizer_source: Path, work: Path) -> tuple[Path, Path, int]:
    """A random Llama of the chosen size with the demo tokenizer, and a LoRA reward adapter on it: (base, reward)."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config import LoraArgs, ModelArgs
    from pipeline.modeling import build_llama_config, build_scalar_model
    from pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    sizes = ModelArgs(preset=args.preset, hidden_size=args.hidden, num_hidden_layers=args.layers)
    config = build_llama_config(sizes, tokenizer, max_seq_len=256)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    base, reward = work / "base", work / "reward"
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    del model
    torch.manual_seed(args.seed + 1)
    scorer = build_scalar_model(base, tokenizer, "lora", LoraArgs(r=16, alpha=32))
    scorer.save_pretrained(str(reward))
    tokenizer.save_pretrained(str(reward))
    return base, reward, params


def lora_for_trl(pcfg: Any, base: Path) -> dict[str, Any]:
    """Our policy adapter's LoRA settings, as peft.LoraConfig keywords for trl's peft_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.modeling import build_lora_config

    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))  # for the settings only
    config = build_lora_config(pcfg.lora, skeleton, "CAUSAL_LM")
    targets = config.target_modules
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }


# --------------------------------------------------------------------------------------------------------------
# Running a side


def run_process(cmd: list[str], log: Path, threads: int) -> dict[str, float]:
    """Run one side to completion; its wall time and peak RSS (os.wait4: this process alone)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    started = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"wall_seconds": time.time() - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def steady_rates(times: list[float], cpu: list[float], episodes_per_update: int) -> dict[str, float | None]:
    """Episodes per second and per CPU-second (the process's, all threads) between the end of the first update and
    the end of the last: warm-up excluded. Per CPU-second is the steadier figure on a machine shared with others."""
    if len(times) < 2:
        return {"episodes_per_s": None, "episodes_per_cpu_s": None}
    episodes = (len(times) - 1) * episodes_per_update
    return {"episodes_per_s": episodes / (times[-1] - times[0]), "episodes_per_cpu_s": episodes / (cpu[-1] - cpu[0])}


def ours_child(recipe: Path, clock: Path) -> None:
    """`rlhf ppo RECIPE` in this process, noting wall-clock and CPU time after each update is logged."""
    from pipeline import cli
    from pipeline.ppo import loop

    marks: dict[str, list[float]] = {"update_times": [], "update_cpu_times": []}
    log_update = loop._log_update

    def timed(*args: Any) -> None:  # the update's record is written: the same point as trl's on_step_end
        log_update(*args)
        marks["update_times"].append(time.time())
        marks["update_cpu_times"].append(time.process_time())

    loop._log_update = timed
    cli.main(["ppo", str(recipe)])
    clock.write_text(json.dumps(marks))


def run_ours(cfg: Any, overrides: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """`rlhf ppo RECIPE` on a recipe holding the run's settings and these overrides, in a child process."""
    from pipeline.config import save_config
    from pipeline.tracking import read_metrics

    run_dir = work / "ours"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this benchmark's own scratch run
    ours = dataclasses.replace(cfg, run_dir=str(run_dir), ppo=dataclasses.replace(cfg.ppo, **overrides))
    recipe, clock = work / "ours_recipe.yaml", work / "ours_clock.json"
    save_config(ours, recipe)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-child", str(recipe), str(clock)]
    proc = run_process(cmd, work / "ours.log", threads)
    marks = json.loads(clock.read_text())
    records = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    last = records[-1]
    rates = steady_rates(marks["update_times"], marks["update_cpu_times"], ours.ppo.rollout_batch_size)
    return {
        **proc,
        **rates,
        "updates": len(records),
        "recipe": str(recipe),
        "adapter": str(run_dir / "ppo" / "final"),
        "last_update": {k: last[k] for k in ("rm_score", "kl", "kl_coef")},
        "time_generate": sum(r["time_generate"] for r in records),
        "time_score": sum(r["time_score"] for r in records),
        "time_optimise": sum(r["time_optimise"] for r in records),
    }


def run_trl(python: Path, spec: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    out = work / "trl"
    if out.exists():
        shutil.rmtree(out)
    spec = {**spec, "out_dir": str(out), "threads": threads}
    path = work / "trl_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    proc = run_process(
        [str(python), str(ROOT / "benchmarks" / "ppo_trl_side.py"), str(path)], work / "trl.log", threads
    )
    result = json.loads((out / "result.json").read_text())
    rates = steady_rates(result["update_times"], result["update_cpu_times"], spec["settings"]["rollout_batch_size"])
    logs = [entry for entry in result["logs"] if "objective/kl" in entry]
    last = logs[-1] if logs else {}
    return {
        **proc,
        **rates,
        "updates": len(result["update_times"]),
        "adapter": str(out / "policy"),
        "self_reported_peak_rss_mb": result["peak_rss_kb"] / 1024,
        "trl_version": result["trl_version"],
        "last_update": {"rm_score": last.get("objective/scores"), "kl": last.get("objective/kl")},
        "parameters_in_memory": result["parameters_in_memory"],
        "trainable_parameters": result["trainable_parameters"],
    }


# --------------------------------------------------------------------------------------------------------------
# One phase


def settings_for(pcfg: Any, trl_kl_coef: float | None) -> dict[str, Any]:
    """The PPO settings both sides get (trl's names in ppo_trl_side.py)."""
    keys = (
        "num_updates",
        "rollout_batch_size",
        "mini_batch_size",
        "ppo_epochs",
        "max_new_tokens",
        "temperature",
        "learning_rate",
        "lr_scheduler_type",
        "weight_decay",
        "kl_estimator",
        "missing_eos_penalty",
        "whiten_rewards",
        "gamma",
        "lam",
        "cliprange",
        "cliprange_value",
        "vf_coef",
    )
    out = {k: getattr(pcfg, k) for k in keys}
    out["forward_batch_size"] = pcfg.forward_batch_size
    out["kl_coef"] = pcfg.init_kl_coef if trl_kl_coef is None else trl_kl_coef
    return out


def check_comparable(pcfg: Any) -> None:
    """Settings trl 1.12 has no counterpart for must be at values where both sides do the same thing."""
    problems = []
    if pcfg.top_k or pcfg.top_p < 1.0:
        problems.append("ppo.top_k/top_p (trl samples with top_k=0, top_p=1)")
    if pcfg.gradient_accumulation_steps != 1:
        problems.append("ppo.gradient_accumulation_steps (mapped as 1)")
    if pcfg.entropy_coef or pcfg.ptx_coef or pcfg.warmup_steps or pcfg.score_clip is not None:
        problems.append("ppo.entropy_coef/ptx_coef/warmup_steps/score_clip (not in trl's PPO)")
    if not pcfg.whiten_advantages or pcfg.max_approx_kl is not None:
        problems.append("ppo.whiten_advantages/max_approx_kl (trl always whitens and never stops early)")
    if pcfg.rollout_batch_size % pcfg.mini_batch_size:
        problems.append("ppo.mini_batch_size")
    if problems:
        raise SystemExit("settings without a trl 1.12 counterpart: " + "; ".join(problems))


def run_phase(
    name: str,
    cfg: Any,
    base: Path,
    reward: Path,
    prompts: dict[str, Path],
    overrides: dict[str, Any],
    args: argparse.Namespace,
    python: Path,
) -> dict[str, Any]:
    """Prepare the shared inputs, then run ours and trl one after the other."""
    from pipeline.config import save_config
    from pipeline.ppo.roles import read_reward_stats
    from pipeline.tokenizer import load_tokenizer

    work = args.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    overrides = {
        "policy_base": str(base),
        "reward_model": str(reward),
        "dataset": str(prompts["train"]),
        "eval_dataset": str(prompts["eval"]),
        "report_to": "none",
        **overrides,
    }
    pcfg = dataclasses.replace(cfg.ppo, **overrides)
    check_comparable(pcfg)
    tokenizer = load_tokenizer(base)
    n_train = write_prompt_ids(prompts["train"], tokenizer, pcfg, work / "train_ids.jsonl")
    write_prompt_ids(prompts["eval"], tokenizer, pcfg, work / "eval_ids.jsonl")
    merged = work / "reward_merged"
    if merged.exists():
        shutil.rmtree(merged)
    merge_reward(reward, merged)
    stats = read_reward_stats(str(reward)) if pcfg.reward_normalization == "reward_stats" else None
    if pcfg.reward_normalization == "running":
        raise SystemExit("ppo.reward_normalization=running has no trl counterpart; use reward_stats or none")
    spec = {
        "policy": str(base),
        "reward": str(merged),
        "prompts": str(work / "train_ids.jsonl"),
        "eval_prompts": str(work / "eval_ids.jsonl"),
        "seed": cfg.seed + pcfg.seed_offset,
        "score_affine": [stats["mean"], stats["std"]] if stats else None,
        "lora": lora_for_trl(pcfg, base),
        "settings": settings_for(pcfg, args.trl_kl_coef),
    }
    save_config(dataclasses.replace(cfg, ppo=pcfg), work / "recipe.yaml")  # the shared settings, for evaluation
    order = [side for side in args.order if side in args.sides]
    print(f"\n[{name}] {n_train} training prompts; running {', then '.join(order)} (logs in {work})", flush=True)
    sides = {}
    for side in order:
        if side == "ours":
            sides["ours"] = run_ours(cfg, {**overrides, **args.ours_set}, work, args.threads)
        else:
            sides["trl"] = run_trl(python, spec, work, args.threads)
        print(
            f"[{name}] {side}: {sides[side]['episodes_per_s'] or float('nan'):.3f} episodes/s "
            f"({sides[side]['episodes_per_cpu_s'] or float('nan'):.3f} per CPU-s), peak RSS "
            f"{sides[side]['peak_rss_mb']:.0f} MB, {sides[side]['wall_seconds']:.0f} s",
            flush=True,
        )
    return {
        "settings": spec["settings"],
        "lora": spec["lora"],
        "score_affine": spec["score_affine"],
        "ours_kl_target": pcfg.kl_target,
        "ours_init_kl_coef": pcfg.init_kl_coef,
        "ours_max_grad_norm": pcfg.max_grad_norm,
        "ours_set": args.ours_set,
        "recipe": str(work / "recipe.yaml"),
        **sides,
    }


# --------------------------------------------------------------------------------------------------------------
# Evaluation of both trained policies (a child process in the project's environment)


def evaluate_child(spec_path: Path) -> None:
    """Both trained adapters on one set of roles, through `evaluate_policies` with the same seed."""
    import torch
    from safetensors.torch import load_file

    from pipeline import demo
    from pipeline.config import load_config
    from pipeline.data.prompts import read_prompts
    from pipeline.generation import SamplingArgs
    from pipeline.ppo.evaluation import evaluate_policies
    from pipeline.ppo.roles import POLICY, build_roles, load_adapter_weights
    from pipeline.ppo.rollout import PromptSet, prepare_prompts

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["recipe"])
    pcfg = cfg.ppo
    roles = build_roles(pcfg, pcfg.policy_base, pcfg.reward_model, torch.device("cpu"))
    records, _ = read_prompts(pcfg.eval_dataset, "eval prompts")
    prompts = prepare_prompts(records, roles.tokenizer, pcfg.max_prompt_len, pcfg.long_prompts, "eval prompts")
    k = spec["samples"]
    prompts = PromptSet(prompts.records * k, prompts.ids * k)
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k, pcfg.top_p, do_sample=True)
    gold = demo.judge(cfg)
    reports = {}
    for side, adapter in spec["adapters"].items():
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        mine = roles.model.peft_config[POLICY]
        if (config["r"], config["lora_alpha"]) != (mine.r, mine.lora_alpha):
            raise SystemExit(f"{adapter}: LoRA r/alpha {config['r']}/{config['lora_alpha']} differ from ours")
        load_adapter_weights(roles.model, POLICY, load_file(str(Path(adapter) / "adapter_model.safetensors")))
        report, samples = evaluate_policies(roles, prompts, sampling, pcfg, gold, torch.device("cpu"), spec["seed"])
        report["ppo_gold_per_episode"] = [row["ppo_gold_score"] for row in samples]
        report["gold_gain_sem"] = _sem([row["ppo_gold_score"] - row["sft_gold_score"] for row in samples])
        reports[side] = report
    Path(spec["out"]).write_text(json.dumps(reports, indent=1))


def evaluate(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every trained policy (each side, each seed) against the SFT policy: {"ours": [per seed], "trl": [...]}."""
    work = args.work_dir / "gold"
    adapters = {f"{side}/{k}": run[side]["adapter"] for k, run in enumerate(runs) for side in args.sides}
    spec = {
        "recipe": runs[0]["recipe"],
        "threads": args.threads,
        "samples": args.eval_samples,
        "seed": args.seed,
        "out": str(work / "eval.json"),
        "adapters": adapters,
    }
    path = work / "eval_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    print(f"[gold] evaluating {len(adapters)} trained policies on the held-out prompts", flush=True)
    run_process(
        [sys.executable, str(Path(__file__).resolve()), "--evaluate", str(path)], work / "eval.log", args.threads
    )
    reports = json.loads((work / "eval.json").read_text())
    return {side: [reports[f"{side}/{k}"] for k in range(len(runs))] for side in args.sides}


def reuse_trl(path: Path, runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """trl's trained runs and their evaluations from an earlier gold phase (results.json) with the same settings."""
    earlier = json.loads(path.read_text())["gold"]
    if len(earlier["runs"]) < len(runs):
        raise SystemExit(f"--trl-from {path} has {len(earlier['runs'])} seeds, this run needs {len(runs)}")
    if earlier.get("first_seed", 0) != args.first_seed:
        raise SystemExit(f"--trl-from {path} starts at seed {earlier.get('first_seed', 0)}; give that --first-seed")
    evaluation = earlier.get("eval", {"samples": 4, "seed": 0})  # results written before this key: the defaults
    if (evaluation["samples"], evaluation["seed"]) != (args.eval_samples, args.seed):
        raise SystemExit(f"--trl-from {path} was evaluated with {evaluation}; give the same --eval-samples, --seed")
    for k, run in enumerate(runs):
        if earlier["runs"][k]["settings"] != run["settings"] or earlier["runs"][k]["lora"] != run["lora"]:
            raise SystemExit(f"--trl-from {path}: seed {k} ran with other PPO settings; train trl again")
        run["trl"] = earlier["runs"][k]["trl"]
    print(f"[gold] trl's {len(runs)} trained policies and their evaluations reused from {path}", flush=True)
    return earlier["evaluation"]["trl"][: len(runs)]


# --------------------------------------------------------------------------------------------------------------
# Report


def _sem(values: list[float]) -> float:
    """Standard error of the mean of `values`."""
    n = len(values)
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def print_settings(phase: dict[str, Any], title: str) -> None:
    s = phase["settings"]
    print(f"\n{title}")
    print(
        f"  rollout batch {s['rollout_batch_size']} episodes (trl: per_device_train_batch_size, accumulation 1), "
        f"mini-batch {s['mini_batch_size']} (trl: num_mini_batches "
        f"{s['rollout_batch_size'] // s['mini_batch_size']}), "
        f"PPO epochs {s['ppo_epochs']} (num_ppo_epochs), {s['num_updates']} updates (total_episodes "
        f"{s['num_updates'] * s['rollout_batch_size']})"
    )
    print(
        f"  response <= {s['max_new_tokens']} tokens, stop at EOS (trl: response_length, stop_token='eos'), "
        f"temperature {s['temperature']}, top-k off, top-p 1; no-grad forward / generation batch "
        f"{s['forward_batch_size']} (local_rollout_forward_batch_size)"
    )
    print(
        f"  learning rate {s['learning_rate']} ({s['lr_scheduler_type']}), AdamW eps 1e-5, weight decay "
        f"{s['weight_decay']}; LoRA {phase['lora']} on the policy "
        "(trl: peft_config; reference = adapter off)"
    )
    print(
        f"  KL {s['kl_estimator']}: ours init {phase['ours_init_kl_coef']} adaptive to target "
        f"{phase['ours_kl_target']} nats; trl fixed kl_coef {s['kl_coef']}; EOS penalty {s['missing_eos_penalty']} "
        f"(missing_eos_penalty); whiten rewards {s['whiten_rewards']}, advantages always; gamma {s['gamma']}, "
        f"lambda {s['lam']}, clip {s['cliprange']}, value clip {s['cliprange_value']}, "
        f"vf_coef {s['vf_coef']}"
    )
    affine = phase["score_affine"]
    norm = f"(score - {affine[0]:.3f}) / {affine[1]:.3f} on both sides" if affine else "none"
    print(
        f"  reward normalisation: {norm}; "
        f"gradient clipping: ours {phase['ours_max_grad_norm']}, trl none; value model: ours a LoRA adapter + head "
        "on the shared base (head / reward_stats std), trl a full copy of the reward model trained in full (raw "
        "head)"
    )
    if phase.get("ours_set"):
        print(f"  ABLATION, our side only: ppo {phase['ours_set']}")


def print_speed(phase: dict[str, Any], label: str) -> dict[str, Any]:
    o, t = phase["ours"], phase["trl"]
    ratios = {
        "episodes_per_s": _ratio(o["episodes_per_s"], t["episodes_per_s"]),
        "episodes_per_cpu_s": _ratio(o["episodes_per_cpu_s"], t["episodes_per_cpu_s"]),
        "peak_rss": _ratio(o["peak_rss_mb"], t["peak_rss_mb"]),
    }
    print(f"\n{label:<34} {'ours':>10} {'trl 1.12':>10} {'ours/trl':>9}  goal")
    print(
        f"{'episodes/s (after update 1)':<34} {_fmt(o['episodes_per_s']):>10} {_fmt(t['episodes_per_s']):>10} "
        f"{_fmt(ratios['episodes_per_s'], 2):>9}  >= 2"
    )
    print(
        f"{'episodes per CPU-second (same)':<34} {_fmt(o['episodes_per_cpu_s']):>10} "
        f"{_fmt(t['episodes_per_cpu_s']):>10} {_fmt(ratios['episodes_per_cpu_s'], 2):>9}  >= 2"
    )
    print(
        f"{'peak RSS of the process (MB)':<34} {o['peak_rss_mb']:>10.0f} {t['peak_rss_mb']:>10.0f} "
        f"{_fmt(ratios['peak_rss'], 2):>9}  <= 0.6"
    )
    share = {side: _ratio(r["episodes_per_s"], r["episodes_per_cpu_s"]) for side, r in (("ours", o), ("trl", t))}
    print(f"{'CPU time / wall time while timed':<34} {_fmt(share['ours'], 2):>10} {_fmt(share['trl'], 2):>10}")
    print(f"{'process wall time (s)':<34} {o['wall_seconds']:>10.0f} {t['wall_seconds']:>10.0f}")
    print(f"{'updates':<34} {o['updates']:>10} {t['updates']:>10}")
    print(
        f"  ours: generate {o['time_generate']:.0f} s, score {o['time_score']:.0f} s, optimise "
        f"{o['time_optimise']:.0f} s over all updates; trl's process reported peak RSS "
        f"{t['self_reported_peak_rss_mb']:.0f} MB, holds {t['parameters_in_memory'] / 1e6:.1f}M parameters "
        f"({t['trainable_parameters'] / 1e6:.2f}M trainable)"
    )
    return ratios


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def print_gold(evaluation: dict[str, list[dict[str, Any]]], phase: dict[str, Any]) -> dict[str, Any]:
    """Per seed and averaged over seeds: gold gain over the SFT policy, KL to the reference, and the rest."""
    o, t = evaluation["ours"], evaluation["trl"]
    seeds, target, first = len(o), phase["ours_kl_target"], phase.get("first_seed", 0)
    gains = {
        side: [r["ppo_gold_score"] - r["sft_gold_score"] for r in reports] for side, reports in evaluation.items()
    }
    print(f"\n{'held-out evaluation, ' + str(o[0]['eval_prompts']) + ' episodes':<40} {'ours':>10} {'trl 1.12':>10}")
    for k in range(seeds):
        seed = f"seed {first + k}"
        print(f"{seed + ': gold gain over SFT':<40} {gains['ours'][k]:>+10.3f} {gains['trl'][k]:>+10.3f}")
        print(f"{seed + ': KL to reference':<40} {o[k]['kl_to_reference']:>10.3f} {t[k]['kl_to_reference']:>10.3f}")
    rows = [
        ("gold score, SFT policy", "sft_gold_score"),
        ("gold score, PPO policy", "ppo_gold_score"),
        ("KL to reference (nats/response)", "kl_to_reference"),
        ("gold win rate vs SFT", "gold_win_rate"),
        ("reward-model score, PPO policy", "ppo_rm_score"),
        ("insult rate, adversarial prompts", "ppo_insult_rate"),
        ("EOS rate, PPO policy", "ppo_eos_rate"),
    ]
    print(f"mean over {seeds} seed{'s' if seeds > 1 else ''}:")
    for name, key in rows:
        ours, trl = _mean([r[key] for r in o]), _mean([r[key] for r in t])
        print(f"{'  ' + name:<40} {_fmt(ours):>10} {_fmt(trl):>10}")
    mean_gain = {side: _mean(values) for side, values in gains.items()}
    if seeds > 1:  # training and evaluation noise together: the spread of the gains over seeds
        sem = {side: _sem(values) for side, values in gains.items()}
        what = f"over {seeds} training seeds"
    else:  # evaluation sampling only; the SFT responses are shared, so the gains differ by the PPO policies' means
        sem = {side: _sem(reports[0]["ppo_gold_per_episode"]) for side, reports in evaluation.items()}
        what = "evaluation sampling only, one training run per side"
    diff_sem = (sem["ours"] ** 2 + sem["trl"] ** 2) ** 0.5
    print(f"{'  gold gain over SFT':<40} {mean_gain['ours']:>+10.3f} {mean_gain['trl']:>+10.3f}")
    print(
        f"  gold gain ours - trl = {mean_gain['ours'] - mean_gain['trl']:+.3f} +- {diff_sem:.3f} (standard error, "
        f"{what}); SFT insult rate {_fmt(o[0]['sft_insult_rate'])}"
    )
    within = {
        side: target is None or all(r["kl_to_reference"] <= target for r in reports)
        for side, reports in evaluation.items()
    }
    return {
        "gold_gain": mean_gain,
        "gold_gain_per_seed": gains,
        "gold_gain_difference_sem": diff_sem,
        "kl_to_reference": {
            side: _mean([r["kl_to_reference"] for r in reports]) for side, reports in evaluation.items()
        },
        "kl_within_target": within,
    }


def print_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of the tracker issue, side by side: ours, trl, ratio, goal, met?"""
    rows = []
    if "speed" in results:
        phase = results["speed"]
        o, t, params = phase["ours"], phase["trl"], phase["model_parameters"] / 1e6
        speed = _ratio(o["episodes_per_s"], t["episodes_per_s"])
        memory = _ratio(o["peak_rss_mb"], t["peak_rss_mb"])
        cpu = _ratio(o["episodes_per_cpu_s"], t["episodes_per_cpu_s"])
        rows += [
            {
                "metric": f"episodes/s, {params:.1f}M-parameter model",
                "ours": _fmt(o["episodes_per_s"]),
                "trl": _fmt(t["episodes_per_s"]),
                "ratio": f"{_fmt(speed, 2)}x",
                "goal": ">= 2x",
                "met": None if speed is None else speed >= 2,
            },
            {
                "metric": "  same, per CPU-second (cross-check)",
                "ours": _fmt(o["episodes_per_cpu_s"]),
                "trl": _fmt(t["episodes_per_cpu_s"]),
                "ratio": f"{_fmt(cpu, 2)}x",
                "goal": ">= 2x",
                "met": None if cpu is None else cpu >= 2,
            },
            {
                "metric": "peak RSS of the process, MB",
                "ours": f"{o['peak_rss_mb']:.0f}",
                "trl": f"{t['peak_rss_mb']:.0f}",
                "ratio": f"{_fmt(memory, 2)}x",
                "goal": "<= 0.6x",
                "met": None if memory is None else memory <= 0.6,
            },
        ]
    if "gold" in results:
        phase = results["gold"]
        comparison, target = phase["comparison"], phase["ours_kl_target"]
        gain, diff_sem, kl = (
            comparison["gold_gain"],
            comparison["gold_gain_difference_sem"],
            comparison["kl_to_reference"],
        )
        within = comparison["kl_within_target"]
        rows += [
            {
                "metric": "gold score gained over SFT",
                "ours": f"{gain['ours']:+.3f}",
                "trl": f"{gain['trl']:+.3f}",
                "ratio": f"{gain['ours'] - gain['trl']:+.3f}+-{diff_sem:.3f}",
                "goal": ">= trl's",
                "met": gain["ours"] >= gain["trl"] and within["ours"],
            },
            {
                "metric": "KL to reference, nats/response",
                "ours": _fmt(kl["ours"]),
                "trl": _fmt(kl["trl"]),
                "ratio": f"{_fmt(_ratio(kl['ours'], kl['trl']), 2)}x",
                "goal": f"<= {target}" if target is not None else "n/a",
                "met": within["ours"] and within["trl"],
            },
        ]
    print(f"\n{'goal (tracker issue 5)':<38} {'ours':>9} {'trl 1.12':>9} {'ours/trl (diff)':>15} {'goal':>9}  met?")
    for r in rows:
        print(f"{r['metric']:<38} {r['ours']:>9} {r['trl']:>9} {r['ratio']:>15} {r['goal']:>9}  {_fmt(r['met'])}")
    if "gold" in results:
        print(
            "  (gold rows: means over the training seeds; KL row met = every policy of both sides within the "
            "target; the gold row also needs ours within it)"
        )
    return rows


# --------------------------------------------------------------------------------------------------------------


def parse_setting(item: str) -> tuple[str, Any]:
    """KEY=VALUE of --ours-set, the value read as YAML (1e9, null, fresh)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--ours-set {item!r} is not KEY=VALUE")
    try:
        return key, float(text) if not text.lstrip("-").isdigit() else int(text)  # YAML reads 1e9 as a string
    except ValueError:
        return key, yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=ROOT / "runs" / "demo",
        help="a demo run with finished sft and reward stages (models, prompts, PPO settings)",
    )
    parser.add_argument("--phases", nargs="+", choices=["speed", "gold"], default=["speed", "gold"])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-ppo-vs-trl")
    parser.add_argument("--out", type=Path, help="results JSON (default WORK_DIR/results.json)")
    parser.add_argument("--venv", type=Path, default=ROOT / "benchmarks" / ".venv-trl112", help="trl's environment")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (pin the run with taskset)")
    parser.add_argument("--order", nargs=2, default=["ours", "trl"], help="which side runs first")
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=["ours", "trl"],
        default=["ours", "trl"],
        help="sides to train (gold phase; without trl, give --trl-from)",
    )
    parser.add_argument(
        "--trl-from",
        type=Path,
        help="gold phase: reuse trl's trained policies and evaluations "
        "from this earlier results.json (same settings, seeds, --eval-samples and --seed)",
    )
    parser.add_argument(
        "--ours-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="ablation: ppo settings for our side only, e.g. max_grad_norm=1e9 (printed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation sampling seed and the speed models' seed")
    parser.add_argument("--trl-kl-coef", type=float, help="trl's fixed kl_coef (default: our ppo.init_kl_coef)")
    speed = parser.add_argument_group("speed phase (random model; the other PPO settings are the run's)")
    speed.add_argument("--preset", default="125m", help="size preset of pipeline/modeling.py")
    speed.add_argument("--hidden", type=int, help="hidden size (default: the preset's)")
    speed.add_argument("--layers", type=int, help="layers (default: the preset's; 125m has 12)")
    speed.add_argument("--updates", type=int, default=5, help="PPO updates (the first is not timed)")
    speed.add_argument("--rollout", type=int, default=16, help="episodes per update")
    speed.add_argument("--mini-batch", type=int, default=8, help="episodes per optimiser step")
    speed.add_argument("--max-new-tokens", type=int, default=32)
    speed.add_argument("--forward-batch", type=int, default=16, help="episodes per no-grad forward / generate call")
    gold = parser.add_argument_group("gold phase (the run's models and PPO settings)")
    gold.add_argument("--gold-updates", type=int, help="PPO updates (default: the run's ppo.num_updates)")
    gold.add_argument("--gold-seeds", type=int, default=3, help="training runs per side (seeds 0..N-1)")
    gold.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (more seeds in another run)")
    gold.add_argument("--eval-samples", type=int, default=4, help="sampled responses per held-out prompt")
    parser.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)  # internal: the evaluation child
    parser.add_argument("--ours-child", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: our side
    args = parser.parse_args()
    args.ours_set = dict(parse_setting(item) for item in args.ours_set)
    if (
        (args.sides == ["ours"]) != bool(args.trl_from)
        or args.sides == ["trl"]
        or (args.trl_from and "speed" in args.phases)
    ):
        parser.error("--sides ours goes with --phases gold and --trl-from (trl's runs), and only with them")
    if args.evaluate:
        evaluate_child(args.evaluate)
        return
    if args.ours_child:
        ours_child(*args.ours_child)
        return

    import torch

    args.run_dir, args.work_dir = args.run_dir.resolve(), args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    python = trl_environment(args.venv.resolve())
    cfg, paths = load_run(args.run_dir, args.work_dir)
    prompts = {"train": paths["train_prompts"], "eval": paths["eval_prompts"]}
    load = os.getloadavg()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "run_dir": str(args.run_dir),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_before": load,
        "torch": torch.__version__,
        "trl": TRL_VERSION,
        "command": " ".join(sys.argv),
    }
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {args.threads} "
        f"threads per side; torch {torch.__version__}; sides run one after the other"
    )

    if "speed" in args.phases:
        work = args.work_dir / "speed"
        work.mkdir(parents=True, exist_ok=True)
        base, reward, params = build_speed_models(args, paths["base"], work)
        overrides = {
            "num_updates": args.updates,
            "rollout_batch_size": args.rollout,
            "mini_batch_size": args.mini_batch,
            "max_new_tokens": args.max_new_tokens,
            "generation_batch_size": args.forward_batch,
            "forward_batch_size": args.forward_batch,
            "reward_normalization": "none",
            "save_steps": args.updates,
            "eval_max_prompts": 4,
            "kl_target": None,
        }
        phase = run_phase("speed", cfg, base, reward, prompts, overrides, args, python)
        phase["model_parameters"] = params
        layers = args.layers or "as preset"
        title = (
            f"speed phase: random Llama ({args.preset} preset, layers {layers}), {params / 1e6:.1f}M "
            "parameters, float32; fixed KL coefficient on both sides"
        )
        print_settings(phase, title)
        phase["ratios"] = print_speed(phase, "speed phase")
        results["speed"] = phase

    if "gold" in args.phases:
        runs = []
        for k in range(args.first_seed, args.first_seed + args.gold_seeds):  # seed k: ppo.seed_offset + k, both sides
            overrides = {"eval_max_prompts": 8, "seed_offset": cfg.ppo.seed_offset + k}
            if args.gold_updates:
                overrides["num_updates"] = args.gold_updates
            runs.append(
                run_phase(f"gold/seed{k}", cfg, paths["base"], paths["reward"], prompts, overrides, args, python)
            )
        trl_reports = reuse_trl(args.trl_from, runs, args) if args.trl_from else None
        phase = {key: value for key, value in runs[0].items() if key not in ("ours", "trl")}
        phase["runs"] = runs
        phase["eval"] = {"samples": args.eval_samples, "seed": args.seed}
        phase["first_seed"] = args.first_seed
        print_settings(
            phase,
            f"gold phase: the demo run's SFT model and reward model ({args.run_dir}), "
            f"{args.gold_seeds} training seed(s) per side",
        )
        phase["evaluation"] = evaluate(runs, args)
        if trl_reports is not None:
            phase["evaluation"]["trl"] = trl_reports
        phase["comparison"] = print_gold(phase["evaluation"], phase)
        results["gold"] = phase

    results["summary"] = print_summary(results)
    results["load_average_after"] = os.getloadavg()
    out = args.out or args.work_dir / "results.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
