"""Our PPO stage, in named configurations, side by side with trl 1.12's PPOTrainer and trl 1.16's RLOO/GRPO.

The trl sides: trl 1.12.0's `trl.experimental.ppo.PPOTrainer` (the last trl with PPO) and trl 1.16's
`trl.RLOOTrainer` and `trl.GRPOTrainer`.

Each side trains in its own process, one after the other (never at once):

- ours: `python -m pipeline ppo RECIPE` in the project's environment, once per named configuration
  (`--ours-config NAME:KEY=VALUE,KEY=VALUE`: plain `ppo.KEY=VALUE` overrides, checked by the pipeline's own config
  loader, so any key the branch has can be given, e.g. `rloo:advantage=rloo,samples_per_prompt=4` or
  `ppo-bf16:mixed_precision=bf16`); without --ours-config there is one configuration, `ours`, the run's settings;
- trl-ppo: benchmarks/ppo_trl_side.py in its own virtual environment (benchmarks/.venv-trl112: trl 1.12.0 beside
  the project's torch, transformers, peft and accelerate versions, installed on the first run and reused);
- trl-rloo, trl-grpo: benchmarks/rl_trl16_side.py in the project's environment (trl 1.16, apart from trl 1.12's),
  our reward model as trl's reward function; their group size and settings are those of our first configuration
  with the same ppo.advantage (else the run's settings with --group-size responses per prompt).

Two phases:

- speed: a randomly initialised Llama (default: the 125m preset, 12 layers, ~86M parameters with the demo
  tokenizer); a LoRA reward adapter on it (random score head; merged into a full model when the run's reward model
  is a full one), a fixed KL coefficient on every side. Measured:
  episodes per second over the updates after the first (warm-up excluded; taken when our update's record is logged,
  at trl 1.12's on_step_end, and at trl 1.16's on_step_end closing a generation batch's last optimiser step), the same
  per CPU-second of the process (steadier on a shared machine), and the peak RSS of each process (os.wait4, whole
  process, imports included).
- gold: the demo run's own models (sft/final/merged, reward/final) and its PPO settings (the run's config.yaml),
  trained --gold-seeds times per side (ppo.seed_offset 0, 1, ..., or from --first-seed); every trained policy is
  then evaluated by our stage's evaluation code (pipeline/ppo/evaluation.py) on the world's held-out PPO prompts, each
  sampled --eval-samples times with the same random stream: gold score gained over the SFT policy, KL to the
  reference (the same k1 sum per response for every side), gold win rate, insult rate, and the gold gain per
  CPU-second of the training process; means over seeds and their standard errors.

Like with like: same base, reward model, prompts (the same token ids), LoRA settings and PPO settings (rollout
batch, mini-batch, PPO epochs, response length, temperature, learning rate and schedule, AdamW eps, KL estimator,
EOS penalty, whitening, clip ranges; GAE and value coefficient for PPO), and the same precision (--precision: ours'
ppo.mixed_precision, trl's bf16 flag; a configuration that sets its own is marked in the table); the reward
model's score is normalised with the reward stage's reward_stats.json on every side. What cannot be matched is
printed with the settings: trl has only a fixed KL coefficient (ours adapts it towards ppo.kl_target; trl gets the
fixed --trl-kl-coef, by default our initial coefficient). trl 1.12 PPO has no gradient clipping, and its value
model is a full copy of the reward model trained in full (ours: a LoRA adapter on the shared base, head divided by
the reward_stats std); its score lands one token after EOS (ours: on EOS), its reward model reads the sampled ids
(ours: the re-tokenised text + EOS), its learning rate steps once per update (ours: per optimiser step), and its old
log-probs come from generate's logits (as ours). trl 1.16 RLOO clips a sequence-level ratio and averages its loss
over sequences (ours: per token, averaged over tokens), and normalises advantages per sequence (ours per token);
trl 1.16 takes old log-probs from a forward pass (ours from the sampling pass), generates a whole rollout in one
generate call and runs its no-grad forwards in mini-batches (ours: ppo.generation_batch_size and
ppo.forward_batch_size), and its mini-batches are the same slices of whole groups on every pass (ours reshuffles the
episodes every epoch); trl's bf16 flag autocasts the training passes only (ours every pass).

    .venv/bin/rlhf run recipes/demo.yaml --until reward          # the gold phase's models, prompts and settings
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/ppo_vs_trl.py --run-dir runs/demo \\
        --ours-config ppo: --ours-config ppo-trunk:critic=trunk --ours-config ppo-bf16:mixed_precision=bf16 \\
        --ours-config rloo:advantage=rloo,samples_per_prompt=4 --ours-config grpo:advantage=grpo,samples_per_prompt=4
    .venv/bin/python benchmarks/ppo_vs_trl.py --phases speed --layers 2 --updates 2 --sides ours trl-rloo  # smoke

Every phase's size is an option, and an estimate of the run's time is printed first (--estimate: only that). --sides
trains a subset (--gold-sides another one in the gold phase); --reuse takes the other sides (trained, timed and
evaluated) from an earlier results.json with the same shared settings, so a long run can be split (a phase not run
at all is taken whole from the first earlier run that has it, for the summary). The run dir may be a copy of a run
(its reward adapter is then re-pointed at the copy's SFT model). Recorded figures: benchmarks/results/ppo_vs_trl.md,
benchmarks/results/ppo_configs.md.

It prints figures (and writes them to --out, default WORK_DIR/results.json); it is not a test. Timings are noisy on
a shared machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
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
TRL_SIDES = {"trl-ppo": ("trl 1.12", "ppo"), "trl-rloo": ("trl 1.16", "rloo"), "trl-grpo": ("trl 1.16", "grpo")}
KINDS = {"gae": "ppo", "rloo": "rloo", "grpo": "grpo"}  # ppo.advantage -> the algorithm's name


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
    from pipeline.ppo.roles import is_adapter

    def moved(path: str | None) -> str | None:
        if path is None:
            return None
        recorded = Path(path)
        for old in (made_in, (ROOT / made_in).resolve()):
            if recorded.is_relative_to(old):
                return str(run_dir / recorded.relative_to(old))
        return path

    if not is_adapter(adapter):  # a fully fine-tuned reward model records no base
        return adapter
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


def build_speed_models(
    args: argparse.Namespace, tokenizer_source: Path, work: Path, full_reward: bool
) -> tuple[Path, Path, int]:
    """A random Llama of the chosen size with the demo tokenizer, and a LoRA reward adapter on it, merged into a full
    reward model when the run's reward model is a full one (as the demo's): (base, reward)."""
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
    if full_reward:
        scorer = scorer.merge_and_unload()
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
    """Run one side to completion; its wall time, CPU time and peak RSS (os.wait4: this process alone)."""
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
    return {
        "wall_seconds": time.time() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


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


def run_ours(name: str, recipe: Path, pcfg: Any, work: Path, threads: int) -> dict[str, Any]:
    """`rlhf ppo RECIPE` on one configuration's resolved recipe, in a child process."""
    from pipeline.tracking import read_metrics

    run_dir = work / name
    clock = work / f"{name}_clock.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-child", str(recipe), str(clock)]
    proc = run_process(cmd, work / f"{name}.log", threads)
    marks = json.loads(clock.read_text())
    records = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    last = records[-1]
    rates = steady_rates(marks["update_times"], marks["update_cpu_times"], pcfg.rollout_batch_size)
    return {
        **proc,
        **rates,
        "updates": len(records),
        "recipe": str(recipe),
        "adapter": str(run_dir / "ppo" / "final"),
        "last_update": {k: last.get(k) for k in ("rm_score", "kl", "kl_coef")},
        "time_generate": sum(r.get("time_generate", 0.0) for r in records),
        "time_score": sum(r.get("time_score", 0.0) for r in records),
        "time_optimise": sum(r.get("time_optimise", 0.0) for r in records),
    }


def run_trl112(python: Path, spec: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """trl 1.12's PPOTrainer (benchmarks/ppo_trl_side.py) in its own environment."""
    out = work / "trl-ppo"
    if out.exists():
        shutil.rmtree(out)
    spec = {**spec, "out_dir": str(out), "threads": threads}
    path = work / "trl-ppo_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    script = str(ROOT / "benchmarks" / "ppo_trl_side.py")
    proc = run_process([str(python), script, str(path)], work / "trl-ppo.log", threads)
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


def run_trl116(name: str, spec: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """trl 1.16's RLOOTrainer or GRPOTrainer (benchmarks/rl_trl16_side.py) in the project's environment."""
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    spec = {**spec, "out_dir": str(out), "threads": threads}
    path = work / f"{name}_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    script = str(ROOT / "benchmarks" / "rl_trl16_side.py")
    proc = run_process([sys.executable, script, str(path)], work / f"{name}.log", threads)
    result = json.loads((out / "result.json").read_text())
    n = result["steps_per_update"]  # an update ends with its generation batch's last optimiser step
    times, cpu = result["step_times"][n - 1 :: n], result["step_cpu_times"][n - 1 :: n]
    rates = steady_rates(times, cpu, spec["settings"]["rollout_batch_size"])
    logs = [entry for entry in result["logs"] if "kl" in entry or "reward" in entry]
    last = logs[-1] if logs else {}
    return {
        **proc,
        **rates,
        "updates": len(times),
        "adapter": str(out / "policy"),
        "self_reported_peak_rss_mb": result["peak_rss_kb"] / 1024,
        "trl_version": result["trl_version"],
        "last_update": {"rm_score": last.get("reward"), "kl": last.get("kl")},
        "parameters_in_memory": result["parameters_in_memory"],
        "trainable_parameters": result["trainable_parameters"],
    }


# --------------------------------------------------------------------------------------------------------------
# The sides of one phase


@dataclasses.dataclass
class Side:
    """One side of the comparison: who trains (ours / trl 1.12 / trl 1.16), which algorithm, with which settings."""

    name: str
    implementation: str  # "ours", "trl 1.12", "trl 1.16"
    kind: str  # "ppo", "rloo", "grpo"
    pcfg: Any  # the resolved ppo settings it trains with (trl: the settings it is matched to)
    precision: str  # "no" (float32) or "bf16"
    overrides: list[str] = dataclasses.field(default_factory=list)  # ours: the configuration's ppo overrides
    recipe: Path | None = None  # ours: the configuration's resolved recipe

    def summary(self) -> dict[str, Any]:
        return {
            "implementation": self.implementation,
            "kind": self.kind,
            "precision": self.precision,
            "samples_per_prompt": self.pcfg.samples_per_prompt,
            "episodes_per_update": self.pcfg.rollout_batch_size,
            "overrides": self.overrides,
        }


def settings_for(pcfg: Any, trl_kl_coef: float | None) -> dict[str, Any]:
    """The settings a trl side gets from ours (trl's names in ppo_trl_side.py and rl_trl16_side.py)."""
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


def check_comparable(pcfg: Any, what: str) -> None:
    """Settings trl has no counterpart for must be at values where the sides do the same thing."""
    problems = []
    if pcfg.top_k or pcfg.top_p < 1.0:
        problems.append("ppo.top_k/top_p (trl samples with top_k=0, top_p=1)")
    if pcfg.gradient_accumulation_steps != 1:
        problems.append("ppo.gradient_accumulation_steps (mapped as 1)")
    if pcfg.entropy_coef or pcfg.ptx_coef or pcfg.warmup_steps or pcfg.score_clip is not None:
        problems.append("ppo.entropy_coef/ptx_coef/warmup_steps/score_clip (not in trl)")
    if pcfg.max_approx_kl is not None:
        problems.append("ppo.max_approx_kl (trl never stops early)")
    if what == "trl 1.12" and not pcfg.whiten_advantages:
        problems.append("ppo.whiten_advantages (trl 1.12 always whitens)")
    if pcfg.rollout_batch_size % pcfg.mini_batch_size:
        problems.append("ppo.mini_batch_size")
    if what == "trl 1.16" and pcfg.mini_batch_size % pcfg.samples_per_prompt:
        problems.append("ppo.mini_batch_size (trl 1.16 needs whole groups of samples_per_prompt per mini-batch)")
    if what == "trl 1.16" and pcfg.advantage == "rloo" and pcfg.kl_estimator != "k1":
        problems.append("ppo.kl_estimator (trl 1.16 RLOO's penalty is k1)")
    if pcfg.reward_normalization == "running":
        problems.append("ppo.reward_normalization=running (use reward_stats or none)")
    if problems:
        raise SystemExit(f"settings without a {what} counterpart: " + "; ".join(problems))


def build_sides(
    args: argparse.Namespace, base_recipe: Path, work: Path, names: list[str], base_pcfg: Any
) -> list[Side]:
    """Every side of `names` for one phase: each of our configurations resolved by the pipeline's config loader from
    the phase's recipe and its overrides (an unknown key fails here, before anything runs), and trl's sides."""
    from pipeline.config import load_config, save_config

    ours: dict[str, Side] = {}
    for name, overrides in args.ours_configs.items():
        run_dir = work / name
        if run_dir.exists() and name in names:
            shutil.rmtree(run_dir)  # this benchmark's own scratch run
        try:
            cfg = load_config(base_recipe, [*overrides, f"run_dir={run_dir}"])
        except Exception as exc:  # the pipeline's UserError names the key
            raise SystemExit(f"--ours-config {name}: {exc}") from None
        recipe = work / f"{name}_recipe.yaml"
        save_config(cfg, recipe)
        precision = {"auto": args.precision}.get(cfg.ppo.mixed_precision, cfg.ppo.mixed_precision)
        ours[name] = Side(name, "ours", KINDS[cfg.ppo.advantage], cfg.ppo, precision, overrides, recipe)
    sides = []
    for name in names:
        if name in ours:
            sides.append(ours[name])
            continue
        implementation, kind = TRL_SIDES[name]
        if kind == "ppo":
            pcfg = base_pcfg
        else:  # matched to our first configuration of the same algorithm, else the run's settings with --group-size
            twin = next((s for s in ours.values() if s.kind == kind), None)
            pcfg = (
                twin.pcfg
                if twin
                else dataclasses.replace(base_pcfg, advantage=kind, samples_per_prompt=args.group_size)
            )
        check_comparable(pcfg, implementation)
        sides.append(Side(name, implementation, kind, pcfg, args.precision))
    return sides


def run_phase(
    name: str,
    cfg: Any,
    base: Path,
    reward: Path,
    prompts: dict[str, Path],
    overrides: dict[str, Any],
    args: argparse.Namespace,
    python: Path | None,
    names: list[str],
) -> dict[str, Any]:
    """Prepare the shared inputs, then train the sides `names` one after the other."""
    from pipeline.config import save_config
    from pipeline.ppo.roles import is_adapter, read_reward_stats, reward_max_len
    from pipeline.tokenizer import load_tokenizer

    work = args.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    overrides = {
        "policy_base": str(base),
        "reward_model": str(reward),
        "dataset": str(prompts["train"]),
        "eval_dataset": str(prompts["eval"]),
        "report_to": "none",
        "mixed_precision": args.precision,
        **overrides,
    }
    pcfg = dataclasses.replace(cfg.ppo, **overrides)
    base_recipe = work / "recipe.yaml"  # the shared settings: our configurations start from it; evaluation reads it
    save_config(dataclasses.replace(cfg, ppo=pcfg), base_recipe)
    sides = build_sides(args, base_recipe, work, names, pcfg)
    tokenizer = load_tokenizer(base)
    n_train = write_prompt_ids(prompts["train"], tokenizer, pcfg, work / "train_ids.jsonl")
    write_prompt_ids(prompts["eval"], tokenizer, pcfg, work / "eval_ids.jsonl")
    stats = read_reward_stats(str(reward)) if pcfg.reward_normalization == "reward_stats" else None
    shared = {
        "policy": str(base),
        "seed": cfg.seed + pcfg.seed_offset,
        "score_affine": [stats["mean"], stats["std"]] if stats else None,
        "lora": lora_for_trl(pcfg, base),
    }
    full = not is_adapter(reward)  # a fully fine-tuned reward model: trl takes it as it is
    merged = reward if full else work / "reward_merged"
    if any(s.name == "trl-ppo" for s in sides) and not full:
        if merged.exists():
            shutil.rmtree(merged)
        merge_reward(reward, merged)
    print(
        f"\n[{name}] {n_train} training prompts; running {', then '.join(names) or 'nothing'} (logs in {work})",
        flush=True,
    )
    results = {}
    for side in sides:
        settings = settings_for(side.pcfg, args.trl_kl_coef)
        if side.implementation == "ours":
            results[side.name] = run_ours(side.name, side.recipe, side.pcfg, work, args.threads)
        elif side.implementation == "trl 1.12":
            spec = {
                **shared,
                "reward": str(merged),
                "prompts": str(work / "train_ids.jsonl"),
                "eval_prompts": str(work / "eval_ids.jsonl"),
                "settings": settings,
                "bf16": side.precision == "bf16",
            }
            results[side.name] = run_trl112(python, spec, work, args.threads)
        else:
            spec = {
                **shared,
                "kind": side.kind,
                "reward": str(reward),
                "reward_max_len": reward_max_len(side.pcfg, str(reward)),
                "prompts": str(prompts["train"]),
                "max_prompt_len": side.pcfg.max_prompt_len,
                "long_prompts": side.pcfg.long_prompts,
                "precision": side.precision,
                "settings": {
                    **settings,
                    "samples_per_prompt": side.pcfg.samples_per_prompt,
                    "max_grad_norm": side.pcfg.max_grad_norm,
                    "whiten_advantages": side.pcfg.whiten_advantages,
                },
            }
            results[side.name] = run_trl116(side.name, spec, work, args.threads)
        results[side.name].update(side.summary())
        r = results[side.name]
        print(
            f"[{name}] {side.name}: {r['episodes_per_s'] or float('nan'):.3f} episodes/s "
            f"({r['episodes_per_cpu_s'] or float('nan'):.3f} per CPU-s), peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['wall_seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU-s)",
            flush=True,
        )
    return {
        "settings": settings_for(pcfg, args.trl_kl_coef),
        "lora": shared["lora"],
        "score_affine": shared["score_affine"],
        "precision": args.precision,
        "group_size": args.group_size,
        "ours_kl_target": pcfg.kl_target,
        "ours_init_kl_coef": pcfg.init_kl_coef,
        "ours_max_grad_norm": pcfg.max_grad_norm,
        "ours_configs": {s.name: s.overrides for s in sides if s.implementation == "ours"},
        "recipe": str(base_recipe),
        "sides": results,
    }


# --------------------------------------------------------------------------------------------------------------
# Evaluation of the trained policies (a child process in the project's environment)


def evaluate_child(spec_path: Path) -> None:
    """Every trained adapter on one set of roles, through `evaluate_policies` with the same seed."""
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
    if spec.get("prompts"):
        prompts = PromptSet(prompts.records[: spec["prompts"]], prompts.ids[: spec["prompts"]])
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


def evaluate(runs: list[dict[str, Any]], recipe: str, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every policy trained in this run (each side, each seed) against the SFT policy: {side: [per seed]}."""
    work = args.work_dir / "gold"
    trained = list(runs[0]["sides"])
    if not trained:
        return {}
    adapters = {f"{side}/{k}": run["sides"][side]["adapter"] for k, run in enumerate(runs) for side in trained}
    spec = {
        "recipe": recipe,
        "threads": args.threads,
        "samples": args.eval_samples,
        "prompts": args.eval_prompts,
        "seed": args.seed,
        "out": str(work / "eval.json"),
        "adapters": adapters,
    }
    path = work / "eval_spec.json"
    path.write_text(json.dumps(spec, indent=1))
    print(f"[gold] evaluating {len(adapters)} trained policies on the held-out prompts", flush=True)
    started = time.time()
    run_process(
        [sys.executable, str(Path(__file__).resolve()), "--evaluate", str(path)], work / "eval.log", args.threads
    )
    print(f"[gold] evaluation took {time.time() - started:.0f} s", flush=True)
    reports = json.loads((work / "eval.json").read_text())
    return {side: [reports[f"{side}/{k}"] for k in range(len(runs))] for side in trained}


# --------------------------------------------------------------------------------------------------------------
# Reusing sides of an earlier run


SHARED_KEYS = ("settings", "lora", "score_affine", "precision")


def in_order(sides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`sides` with our configurations first (in --ours-config order), then trl's, then anything reused."""
    order = [*args.ours_configs, *TRL_SIDES]
    return dict(sorted(sides.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def reuse_speed(phase: dict[str, Any], earlier: list[tuple[Path, dict[str, Any]]]) -> None:
    """Sides of earlier speed phases with the same shared settings and model that this run did not train."""
    for path, results in earlier:
        old = results.get("speed")
        if old is None or "sides" not in old:
            continue
        same = all(old.get(k) == phase.get(k) for k in SHARED_KEYS + ("model_parameters",))
        for side, result in old["sides"].items():
            if side in phase["sides"]:
                continue
            if not same:
                raise SystemExit(f"--reuse {path}: its speed phase ran with other settings; train {side} again")
            phase["sides"][side] = {**result, "reused_from": str(path)}
            print(f"[speed] {side} reused from {path}", flush=True)


def reuse_gold(phase: dict[str, Any], earlier: list[tuple[Path, dict[str, Any]]], args: argparse.Namespace) -> None:
    """Sides (trained policies and their evaluations) of earlier gold phases that this run did not train."""
    runs = phase["runs"]
    for path, results in earlier:
        old = results.get("gold")
        if old is None or "runs" not in old or "sides" not in old["runs"][0]:
            continue
        for side in old["runs"][0]["sides"]:
            if side in runs[0]["sides"]:
                continue
            problem = None
            if any(old.get(k) != phase.get(k) for k in SHARED_KEYS):
                problem = "other settings"
            elif len(old["runs"]) < len(runs) or old.get("first_seed") != args.first_seed:
                problem = f"seeds from {old.get('first_seed')}, {len(old['runs'])} of them"
            elif old.get("eval") != phase["eval"]:
                problem = f"evaluation {old.get('eval')}"
            if problem:
                raise SystemExit(f"--reuse {path}: its gold phase ran with {problem}; train {side} again")
            for k, run in enumerate(runs):
                run["sides"][side] = {**old["runs"][k]["sides"][side], "reused_from": str(path)}
            phase["evaluation"][side] = old["evaluation"][side][: len(runs)]
            print(f"[gold] {side}: {len(runs)} trained policies and their evaluations reused from {path}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Report


def _sem(values: list[float]) -> float:
    """Standard error of the mean of `values`."""
    n = len(values)
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


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


def _label(result: dict[str, Any]) -> str:
    """ "ours rloo K=4 bf16" """
    k = result.get("samples_per_prompt", 1)
    group = f" K={k}" if k > 1 else ""
    precision = " bf16" if result.get("precision") == "bf16" else ""
    return f"{result['implementation']} {result['kind']}{group}{precision}"


UNMATCHED = {
    "trl 1.12": (
        "trl 1.12 PPO: fixed kl_coef (ours adapts it towards ppo.kl_target); no gradient clipping; value model a full"
        " copy of the reward model trained in full (ours: a LoRA adapter + head on the shared base, or with "
        "critic_placement=separate on the reward model's own weights, head / reward_stats std; with ppo.critic=trunk or "
        "head a head on the policy's own states; with ppo.critic=reward a head on the frozen reward model's states); "
        "score one token after EOS; the reward model reads the sampled ids (ours: re-tokenised text + end of turn, "
        "unless ppo.reward_input=ids); learning rate steps per update (ours: per optimiser step)"
    ),
    "trl 1.16": (
        "trl 1.16 RLOO/GRPO: fixed beta (ours adapts the KL coefficient towards ppo.kl_target); old log-probs from a "
        "forward pass (ours: the sampling pass's logits); one generate call per rollout and no-grad forwards in mini-"
        "batches (ours: generation_batch_size / forward_batch_size); its mini-batches are the same slices of whole "
        "groups on every pass (ours: episodes reshuffled every epoch); RLOO clips a sequence-level ratio, averages "
        "its loss over sequences and normalises advantages per sequence (ours: per token); bf16 autocasts the "
        "training passes only (ours: every pass); a reward adapter is merged into its own copy of the base (ours: an "
        "adapter on the policy's base unless reward_placement=separate)"
    ),
}


def print_settings(phase: dict[str, Any], title: str) -> None:
    s = phase["settings"]
    print(f"\n{title}")
    print(
        f"  rollout batch {s['rollout_batch_size']} episodes (trl 1.12: per_device_train_batch_size; trl 1.16: "
        f"generation batch), mini-batch {s['mini_batch_size']} (trl 1.12: num_mini_batches "
        f"{s['rollout_batch_size'] // s['mini_batch_size']}; trl 1.16: per_device_train_batch_size, "
        f"steps_per_generation {s['rollout_batch_size'] // s['mini_batch_size']}), PPO epochs {s['ppo_epochs']} "
        f"(num_ppo_epochs; num_iterations), {s['num_updates']} updates ({s['num_updates'] * s['rollout_batch_size']} "
        "episodes)"
    )
    print(
        f"  response <= {s['max_new_tokens']} tokens, stop at EOS / end of turn (response_length, stop_token='eos'; "
        f"max_completion_length), temperature {s['temperature']}, top-k off, top-p 1; no-grad forward batch "
        f"{s['forward_batch_size']}"
    )
    print(
        f"  learning rate {s['learning_rate']} ({s['lr_scheduler_type']}), AdamW eps 1e-5, weight decay "
        f"{s['weight_decay']}; LoRA {phase['lora']} on the policy (trl: peft_config; reference = adapter off); "
        f"precision {'bf16 autocast' if phase['precision'] == 'bf16' else 'float32'} on every side unless marked"
    )
    print(
        f"  KL {s['kl_estimator']}: ours init {phase['ours_init_kl_coef']} adaptive to target "
        f"{phase['ours_kl_target']} nats; trl fixed kl_coef / beta {s['kl_coef']}; EOS penalty "
        f"{s['missing_eos_penalty']} (trl 1.16: in the reward function); whiten rewards {s['whiten_rewards']}; "
        f"PPO: gamma {s['gamma']}, lambda {s['lam']}, clip {s['cliprange']}, value clip {s['cliprange_value']}, "
        f"vf_coef {s['vf_coef']}; RLOO/GRPO: clip (epsilon) {s['cliprange']}, GRPO's KL k3 in the loss"
    )
    affine = phase["score_affine"]
    norm = f"(score - {affine[0]:.3f}) / {affine[1]:.3f} on every side" if affine else "none"
    print(f"  reward normalisation: {norm}; gradient clipping: ours and trl 1.16 {phase['ours_max_grad_norm']}")
    for name, overrides in phase["ours_configs"].items():
        print(f"  {name} (ours): {' '.join(overrides) or 'the run settings'}")
    sides = phase["sides"] if "sides" in phase else phase["runs"][0]["sides"]
    for name, r in sides.items():
        if r["implementation"] != "ours":
            print(f"  {name}: {_label(r)}, {r['episodes_per_update']} episodes per update")
    for implementation in sorted({r["implementation"] for r in sides.values()} - {"ours"}):
        print(f"  not matched, {UNMATCHED[implementation]}")


def print_speed(phase: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each side's episodes/s, per CPU-second and peak RSS, with its ratios to trl 1.12 PPO."""
    sides, ref = phase["sides"], phase["sides"].get("trl-ppo")
    ratios = {}
    print(
        f"\n{'speed phase':<14} {'side':<24} {'ep/s':>7} {'xPPO112':>8} {'ep/CPU-s':>9} {'xPPO112':>8} "
        f"{'RSS MB':>7} {'xPPO112':>8} {'CPU/wall':>8} {'wall s':>7}"
    )
    for name, r in sides.items():
        ratios[name] = {
            "episodes_per_s": _ratio(r["episodes_per_s"], ref and ref["episodes_per_s"]),
            "episodes_per_cpu_s": _ratio(r["episodes_per_cpu_s"], ref and ref["episodes_per_cpu_s"]),
            "peak_rss": _ratio(r["peak_rss_mb"], ref and ref["peak_rss_mb"]),
        }
        share = _ratio(r["episodes_per_s"], r["episodes_per_cpu_s"])
        print(
            f"{name:<14} {_label(r):<24} {_fmt(r['episodes_per_s']):>7} {_fmt(ratios[name]['episodes_per_s'], 2):>8} "
            f"{_fmt(r['episodes_per_cpu_s']):>9} {_fmt(ratios[name]['episodes_per_cpu_s'], 2):>8} "
            f"{r['peak_rss_mb']:>7.0f} {_fmt(ratios[name]['peak_rss'], 2):>8} {_fmt(share, 2):>8} "
            f"{r['wall_seconds']:>7.0f}{'  (reused)' if r.get('reused_from') else ''}"
        )
    for name, r in sides.items():
        if r["implementation"] == "ours":
            print(
                f"  {name}: generate {r['time_generate']:.0f} s, score {r['time_score']:.0f} s, optimise "
                f"{r['time_optimise']:.0f} s over all updates"
            )
        else:
            print(
                f"  {name}: holds {r['parameters_in_memory'] / 1e6:.1f}M parameters "
                f"({r['trainable_parameters'] / 1e6:.2f}M trainable), reported peak RSS "
                f"{r['self_reported_peak_rss_mb']:.0f} MB"
            )
    return ratios


def gold_figures(phase: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per side: gold gain, KL, CPU-seconds and gain per CPU-second, per seed and as mean +- standard error."""
    target = phase["ours_kl_target"]
    out = {}
    for side, reports in phase["evaluation"].items():
        runs = [run["sides"][side] for run in phase["runs"]]
        gains = [r["ppo_gold_score"] - r["sft_gold_score"] for r in reports]
        kls = [r["kl_to_reference"] for r in reports]
        cpu = [run["cpu_seconds"] for run in runs]
        per_cpu = [g / c for g, c in zip(gains, cpu, strict=True)]
        if len(gains) > 1:  # training and evaluation noise together: the spread over seeds
            gain_sem, per_cpu_sem = _sem(gains), _sem(per_cpu)
        else:  # evaluation sampling only (one training run): the spread of the policy's gold scores
            gain_sem = _sem(reports[0]["ppo_gold_per_episode"])
            per_cpu_sem = gain_sem / cpu[0]
        out[side] = {
            "label": _label(runs[0]),
            "implementation": runs[0]["implementation"],
            "kind": runs[0]["kind"],
            "precision": runs[0]["precision"],
            "gold_gain": _mean(gains),
            "gold_gain_sem": gain_sem,
            "gold_gain_per_seed": gains,
            "kl_to_reference": _mean(kls),
            "kl_sem": _sem(kls),
            "kl_within_target": target is None or all(kl <= target for kl in kls),
            "cpu_seconds": _mean(cpu),
            "gold_gain_per_cpu_s": _mean(per_cpu),
            "gold_gain_per_cpu_s_sem": per_cpu_sem,
            "episodes_per_s": _mean([run["episodes_per_s"] for run in runs]),
            "gold_win_rate": _mean([r["gold_win_rate"] for r in reports]),
            "ppo_insult_rate": _mean([r.get("ppo_insult_rate") for r in reports]),
            "ppo_eos_rate": _mean([r["ppo_eos_rate"] for r in reports]),
            "sft_gold_score": reports[0]["sft_gold_score"],
        }
    return out


def print_gold(phase: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per seed and averaged over seeds: gold gain over the SFT policy, KL to the reference, gain per CPU-second."""
    figures = gold_figures(phase)
    evaluation, first = phase["evaluation"], phase.get("first_seed", 0)
    seeds = len(phase["runs"])
    episodes = next(iter(evaluation.values()))[0]["eval_prompts"] if evaluation else 0
    print(f"\nheld-out evaluation, {episodes} episodes per policy; gold gain over SFT / KL to reference per seed:")
    for side, f in figures.items():
        per_seed = "  ".join(
            f"seed {first + k}: {g:+.3f} / {evaluation[side][k]['kl_to_reference']:.2f}"
            for k, g in enumerate(f["gold_gain_per_seed"])
        )
        print(f"  {side:<12} {per_seed}")
    what = f"over {seeds} training seeds" if seeds > 1 else "evaluation sampling only, one training run per side"
    print(
        f"\nmean over {seeds} seed{'s' if seeds > 1 else ''} (+- standard error, {what}); SFT gold score "
        f"{_fmt(next(iter(figures.values()))['sft_gold_score']) if figures else 'n/a'}"
    )
    print(
        f"{'side':<14} {'':<24} {'gold gain':>15} {'KL to ref':>13} {'in KL':>5} {'win':>5} {'insult':>6} "
        f"{'EOS':>5} {'CPU-s':>6} {'gain per CPU-s':>19} {'ep/s':>6}"
    )
    for side, f in figures.items():
        print(
            f"{side:<14} {f['label']:<24} {f['gold_gain']:>+8.3f}+-{f['gold_gain_sem']:.3f} "
            f"{f['kl_to_reference']:>7.2f}+-{f['kl_sem']:.2f} {_fmt(f['kl_within_target']):>5} "
            f"{_fmt(f['gold_win_rate'], 2):>5} {_fmt(f['ppo_insult_rate'], 2):>6} {_fmt(f['ppo_eos_rate'], 2):>5} "
            f"{f['cpu_seconds']:>6.0f} {f['gold_gain_per_cpu_s']:>10.2e}+-{f['gold_gain_per_cpu_s_sem']:.1e} "
            f"{_fmt(f['episodes_per_s'], 2):>6}"
        )
    return figures


def print_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of our configurations against trl 1.12 PPO (episodes/s, memory, gold gain), and our RLOO / GRPO
    against trl 1.16's (gold gain per CPU-second)."""
    rows = []
    speed = results.get("speed", {}).get("sides", {})
    gold = results.get("gold", {}).get("comparison", {})
    names = list(dict.fromkeys([*speed, *gold]))
    ours = [n for n in names if (speed.get(n) or gold.get(n))["implementation"] == "ours"]

    def add(metric: str, mine: str, theirs: str, ratio: str, goal: str, met: bool | None) -> None:
        rows.append({"metric": metric, "ours": mine, "trl": theirs, "ratio": ratio, "goal": goal, "met": met})

    ref = speed.get("trl-ppo")
    for name in ours:
        r = speed.get(name)
        if r is not None and ref is not None:
            star = "" if r["precision"] == ref["precision"] else "*"
            speedup = _ratio(r["episodes_per_s"], ref["episodes_per_s"])
            cpu = _ratio(r["episodes_per_cpu_s"], ref["episodes_per_cpu_s"])
            memory = _ratio(r["peak_rss_mb"], ref["peak_rss_mb"])
            add(
                f"{name}{star}: episodes/s",
                _fmt(r["episodes_per_s"]),
                _fmt(ref["episodes_per_s"]),
                f"{_fmt(speedup, 2)}x",
                ">= 2x",
                None if speedup is None else speedup >= 2,
            )
            add(
                f"{name}{star}: episodes/CPU-s",
                _fmt(r["episodes_per_cpu_s"]),
                _fmt(ref["episodes_per_cpu_s"]),
                f"{_fmt(cpu, 2)}x",
                ">= 2x",
                None if cpu is None else cpu >= 2,
            )
            add(
                f"{name}{star}: peak RSS, MB",
                f"{r['peak_rss_mb']:.0f}",
                f"{ref['peak_rss_mb']:.0f}",
                f"{_fmt(memory, 2)}x",
                "<= 0.6x",
                None if memory is None else memory <= 0.6,
            )
        g = gold.get(name)
        for twin_name in dict.fromkeys([f"trl-{g['kind']}", "trl-ppo"]) if g else []:
            twin = gold.get(twin_name)
            if twin is None:
                continue
            star = "" if g["precision"] == twin["precision"] else "*"
            if twin_name == f"trl-{g['kind']}":  # the same algorithm: gold gain and KL side by side
                diff = g["gold_gain"] - twin["gold_gain"]
                diff_sem = (g["gold_gain_sem"] ** 2 + twin["gold_gain_sem"] ** 2) ** 0.5
                add(
                    f"{name}{star}: gold gain vs {twin_name}",
                    f"{g['gold_gain']:+.3f}",
                    f"{twin['gold_gain']:+.3f}",
                    f"{diff:+.3f}+-{diff_sem:.3f}",
                    ">= trl's",
                    g["gold_gain"] >= twin["gold_gain"] and g["kl_within_target"],
                )
                add(
                    f"{name}{star}: KL to reference vs {twin_name}",
                    _fmt(g["kl_to_reference"], 2),
                    _fmt(twin["kl_to_reference"], 2),
                    f"{_fmt(_ratio(g['kl_to_reference'], twin['kl_to_reference']), 2)}x",
                    f"<= {results['gold']['ours_kl_target']}",
                    g["kl_within_target"] and twin["kl_within_target"],
                )
            per_cpu = _ratio(g["gold_gain_per_cpu_s"], twin["gold_gain_per_cpu_s"])
            add(
                f"{name}{star}: gold gain/CPU-s vs {twin_name}",
                f"{g['gold_gain_per_cpu_s']:.2e}",
                f"{twin['gold_gain_per_cpu_s']:.2e}",
                f"{_fmt(per_cpu, 2)}x" if twin["gold_gain_per_cpu_s"] > 0 else "n/a",
                ">= 1x",
                None if per_cpu is None or twin["gold_gain_per_cpu_s"] <= 0 else per_cpu >= 1,
            )
    title = "summary: ours vs trl (trl-ppo = trl 1.12 PPO)"
    print(f"\n{title:<46} {'ours':>9} {'trl':>9} {'ours/trl (diff)':>15} {'goal':>9}  met?")
    for r in rows:
        print(f"{r['metric']:<46} {r['ours']:>9} {r['trl']:>9} {r['ratio']:>15} {r['goal']:>9}  {_fmt(r['met'])}")
    if any("*" in r["metric"] for r in rows):
        print("  * at another precision than the trl side it is compared with")
    if gold:
        print(
            "  (gold rows: means over the training seeds, +- standard error of the difference; an ours row is met "
            "only within the KL target; the KL row needs both sides within it; gain/CPU-s: gold gain over the "
            "CPU-seconds of the whole training process)"
        )
    return rows


# --------------------------------------------------------------------------------------------------------------
# Command line


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


def parse_ours_config(item: str, common: list[str]) -> tuple[str, list[str]]:
    """NAME:KEY=VALUE,KEY=VALUE -> (NAME, ["ppo.KEY=VALUE", ...]); a comma starts a new pair only before KEY=."""
    name, sep, body = item.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or name in TRL_SIDES:
        raise SystemExit(f"--ours-config {item!r} is not NAME:KEY=VALUE,... (NAME not one of {', '.join(TRL_SIDES)})")
    pairs = [p for p in re.split(r",(?=[A-Za-z_][\w.]*=)", body) if p]
    if any("=" not in p for p in pairs):
        raise SystemExit(f"--ours-config {item!r}: every setting must be KEY=VALUE")
    return name, [*common, *(p if p.startswith("ppo.") else f"ppo.{p}" for p in pairs)]


def expand_sides(requested: list[str], configs: list[str]) -> list[str]:
    """--sides: configuration names, `ours` (all of them), trl-ppo, trl-rloo, trl-grpo (`trl`: trl-ppo)."""
    out = []
    for item in requested:
        names = configs if item == "ours" else ["trl-ppo"] if item == "trl" else [item]
        for name in names:
            if name not in configs and name not in TRL_SIDES:
                raise SystemExit(f"--sides {item}: not one of ours, {', '.join(configs + list(TRL_SIDES))}")
            out.append(name)
    return list(dict.fromkeys(out))


# Seconds per episode measured on one quiet core (benchmarks/results/ppo_vs_trl.md, 2026-11-26): 1.77 at 86.8M
# parameters with 32-token responses, 0.105 on the demo model with 40; a process starts in about 30 s (speed phase)
# or 10 s (gold). A critic-free configuration skips the value passes: about 0.6 of PPO's CPU time in the gold phase
# (benchmarks/results/ppo_configs.md), PPO with ppo.critic=trunk, head or reward about 0.5; evaluating a policy costs about 0.7 of
# a gold-phase episode per held-out one.
COST = {"ppo": 1.0, "ppo-trunk": 0.5, "rloo": 0.6, "grpo": 0.6}


def estimate_minutes(args: argparse.Namespace, cfg: Any, params: float | None) -> dict[str, float]:
    """A rough forecast of each phase's minutes on one quiet core, from the figures above."""

    def kinds(names: list[str]) -> list[str]:
        out = []
        for name in names:
            if name in TRL_SIDES:
                out.append(TRL_SIDES[name][1])
            else:
                overrides = " ".join(args.ours_configs[name])
                kind = next((k for k in ("rloo", "grpo") if f"advantage={k}" in overrides), "ppo")
                trunk = any(f"critic={c}" in overrides for c in ("trunk", "head", "reward"))
                out.append("ppo-trunk" if kind == "ppo" and trunk else kind)
        return out

    out = {}
    if "speed" in args.phases:
        per_episode = 1.77 * (params or 86.8e6) / 86.8e6 * args.max_new_tokens / 32
        episodes = args.updates * args.rollout
        out["speed"] = sum(30 + episodes * per_episode * COST[k] for k in kinds(args.sides)) / 60
    if "gold" in args.phases:
        pcfg = cfg.ppo
        episodes = (args.gold_updates or pcfg.num_updates) * pcfg.rollout_batch_size
        per_episode = 0.105 * pcfg.max_new_tokens / 40
        gold = kinds(args.gold_sides)
        train = sum(10 + episodes * per_episode * COST[k] for k in gold) * args.gold_seeds
        prompts = args.eval_prompts or cfg.world.n_eval_prompts
        evaluation = 15 + len(gold) * args.gold_seeds * prompts * args.eval_samples * per_episode * 0.7
        out["gold"] = (train + evaluation) / 60
    return out


def check_ours_configs(args: argparse.Namespace, recipe: Path) -> None:
    """Every configuration's overrides on the run's recipe, through the pipeline's config loader: an unknown key
    or a bad value stops the benchmark before anything is trained."""
    from pipeline.config import load_config

    for name, overrides in args.ours_configs.items():
        try:
            load_config(recipe, overrides)
        except Exception as exc:  # the pipeline's UserError names the key
            raise SystemExit(f"--ours-config {name}: {exc}") from None


def speed_parameters(args: argparse.Namespace, tokenizer_source: Path) -> float:
    """Parameters of the speed phase's model (built on the meta device: nothing allocated)."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config import ModelArgs
    from pipeline.modeling import build_llama_config
    from pipeline.tokenizer import load_tokenizer

    sizes = ModelArgs(preset=args.preset, hidden_size=args.hidden, num_hidden_layers=args.layers)
    config = build_llama_config(sizes, load_tokenizer(tokenizer_source), max_seq_len=256)
    with torch.device("meta"):
        return float(sum(p.numel() for p in LlamaForCausalLM(config).parameters()))


def parse_args() -> argparse.Namespace:
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
    parser.add_argument(
        "--venv", type=Path, default=ROOT / "benchmarks" / ".venv-trl112", help="trl 1.12's environment"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (pin the run with taskset)")
    parser.add_argument(
        "--ours-config",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one of our configurations: a name and ppo overrides (e.g. rloo:advantage=rloo,samples_per_prompt=4; "
        "ppo: for the run's settings); repeat for several; default one configuration named 'ours'",
    )
    parser.add_argument(
        "--ours-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="ppo settings added to every one of our configurations, e.g. max_grad_norm=1e9 (printed)",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["ours", *TRL_SIDES],
        help="sides to train, in this order: configuration names or 'ours' (all of them), trl-ppo, trl-rloo, "
        "trl-grpo (default: all)",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="an earlier results.json: the sides it holds that this run does not train are taken from it "
        "(same shared settings; gold: same seeds, --eval-samples, --eval-prompts and --seed); repeatable",
    )
    parser.add_argument("--trl-from", type=Path, help="the same as --reuse (kept for older commands)")
    parser.add_argument(
        "--precision",
        choices=["no", "bf16"],
        default="no",
        help="every side's precision: float32 ('no') or bf16 autocast (ours: ppo.mixed_precision; trl: bf16); a "
        "configuration may set its own mixed_precision, marked in the table",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="trl 1.16's num_generations when no configuration of ours is its twin",
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation sampling seed and the speed models' seed")
    parser.add_argument("--trl-kl-coef", type=float, help="trl's fixed kl_coef / beta (default: our ppo.init_kl_coef)")
    parser.add_argument("--estimate", action="store_true", help="print the time estimate and stop")
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
    gold.add_argument(
        "--gold-sides", nargs="+", help="sides to train in the gold phase, as --sides (default: those of --sides)"
    )
    gold.add_argument("--gold-updates", type=int, help="PPO updates (default: the run's ppo.num_updates)")
    gold.add_argument("--gold-seeds", type=int, default=3, help="training runs per side (seeds 0..N-1)")
    gold.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (more seeds in another run)")
    gold.add_argument("--eval-samples", type=int, default=4, help="sampled responses per held-out prompt")
    gold.add_argument("--eval-prompts", type=int, help="held-out prompts evaluated (default: all)")
    parser.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)  # internal: the evaluation child
    parser.add_argument("--ours-child", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: our side
    args = parser.parse_args()
    common = [
        f"ppo.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in map(parse_setting, args.ours_set)
    ]
    configs = args.ours_config or ["ours:"]
    args.ours_configs = dict(parse_ours_config(item, common) for item in configs)
    if len(args.ours_configs) < len(configs):
        parser.error("--ours-config names must differ")
    args.sides = expand_sides(args.sides, list(args.ours_configs))
    args.gold_sides = expand_sides(args.gold_sides, list(args.ours_configs)) if args.gold_sides else args.sides
    args.reuse = [*args.reuse, *([args.trl_from] if args.trl_from else [])]
    return args


def main() -> None:
    args = parse_args()
    if args.evaluate:
        evaluate_child(args.evaluate)
        return
    if args.ours_child:
        ours_child(*args.ours_child)
        return

    import torch

    args.run_dir, args.work_dir = args.run_dir.resolve(), args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cfg, paths = load_run(args.run_dir, args.work_dir)
    check_ours_configs(args, args.run_dir / "config.yaml")
    params = speed_parameters(args, paths["base"]) if "speed" in args.phases else None
    minutes = estimate_minutes(args, cfg, params)
    print(
        "estimate on one quiet core: "
        + ", ".join(f"{phase} phase about {m:.0f} min" for phase, m in minutes.items())
        + f" (sides: {', '.join(args.sides)}; gold phase: {', '.join(args.gold_sides)})",
        flush=True,
    )
    if args.estimate:
        return
    trains_trl112 = ("speed" in args.phases and "trl-ppo" in args.sides) or (
        "gold" in args.phases and "trl-ppo" in args.gold_sides
    )
    python = trl_environment(args.venv.resolve()) if trains_trl112 else None
    earlier = [(path, json.loads(path.read_text())) for path in args.reuse]
    prompts = {"train": paths["train_prompts"], "eval": paths["eval_prompts"]}
    load = os.getloadavg()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "run_dir": str(args.run_dir),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_before": load,
        "torch": torch.__version__,
        "trl": {"trl-ppo": TRL_VERSION, "trl-rloo/grpo": version("trl")},
        "command": " ".join(sys.argv),
        "estimate_minutes": minutes,
    }
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {args.threads} "
        f"threads per side; torch {torch.__version__}; trl {TRL_VERSION} and {version('trl')}; sides run one after "
        "the other"
    )

    if "speed" in args.phases:
        work = args.work_dir / "speed"
        work.mkdir(parents=True, exist_ok=True)
        from pipeline.ppo.roles import is_adapter

        full_reward = not is_adapter(paths["reward"])
        base, reward, params = build_speed_models(args, paths["base"], work, full_reward)
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
        phase = run_phase("speed", cfg, base, reward, prompts, overrides, args, python, args.sides)
        phase["model_parameters"] = params
        reuse_speed(phase, earlier)
        phase["sides"] = in_order(phase["sides"], args)
        layers = args.layers or "as preset"
        title = (
            f"speed phase: random Llama ({args.preset} preset, layers {layers}), {params / 1e6:.1f}M "
            f"parameters; {'a full' if full_reward else 'a LoRA adapter'} reward model, as the run's; fixed KL "
            "coefficient on every side"
        )
        print_settings(phase, title)
        phase["ratios"] = print_speed(phase)
        results["speed"] = phase

    if "gold" in args.phases:
        runs = []
        for k in range(args.first_seed, args.first_seed + args.gold_seeds):  # seed k: ppo.seed_offset + k, all sides
            overrides = {"eval_max_prompts": 8, "seed_offset": cfg.ppo.seed_offset + k}
            if args.gold_updates:
                overrides["num_updates"] = args.gold_updates
            run = run_phase(
                f"gold/seed{k}", cfg, paths["base"], paths["reward"], prompts, overrides, args, python, args.gold_sides
            )
            runs.append({"seed": k, "sides": run.pop("sides"), "recipe": run["recipe"]})
            shared = run
        phase = {**shared, "runs": runs, "first_seed": args.first_seed}
        phase["eval"] = {"samples": args.eval_samples, "seed": args.seed, "prompts": args.eval_prompts}
        phase["evaluation"] = evaluate(runs, runs[0]["recipe"], args)
        reuse_gold(phase, earlier, args)
        phase["evaluation"] = in_order(phase["evaluation"], args)
        for run in runs:
            run["sides"] = in_order(run["sides"], args)
        print_settings(
            phase,
            f"gold phase: the demo run's SFT model and reward model ({args.run_dir}), "
            f"{args.gold_seeds} training seed(s) per side",
        )
        phase["comparison"] = print_gold(phase)
        results["gold"] = phase

    for name in ("speed", "gold"):  # a phase not run now: the first earlier run's, for the summary
        earlier_phase = next(((path, r[name]) for path, r in earlier if name not in results and name in r), None)
        if earlier_phase is not None:
            results[name] = {**earlier_phase[1], "reused_from": str(earlier_phase[0])}
            print(f"\n[{name}] the whole phase taken from {earlier_phase[0]} for the summary", flush=True)
    results["summary"] = print_summary(results)
    results["load_average_after"] = os.getloadavg()
    out = args.out or args.work_dir / "results.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
