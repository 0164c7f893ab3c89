"""Stage 4: PPO of a LoRA policy against the reward model, every role on one copy of the SFT model's weights.

Reads `sft/final/merged` (the base), `reward/final` (reward adapter, score head, reward_stats.json) and the prompts;
writes `ppo/final/`: the policy adapter + tokenizer at the root, `value/` (value adapter + head), `eval.json`,
`samples.jsonl`, `stage.json`; per-update metrics in `ppo/metrics.jsonl` (and TensorBoard in `ppo/tensorboard/`).

    rlhf ppo recipes/demo.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m pipeline ppo recipes/llama-125m-fineweb.yaml

Each update: sample a rollout batch (pipeline/ppo/rollout.py), then `ppo_epochs` passes over it in mini-batches,
each one optimiser step over the policy adapter, the value adapter and the value head (gradients averaged over
processes by one all-reduce: the frozen base is replicated, only adapters train). A checkpoint holds everything the
next update depends on, so a run killed at any point continues exactly as if it had not stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import demo
from pipeline.checkpoints import (
    begin_stage,
    final_dir,
    finishing,
    list_checkpoints,
    newest_checkpoint,
    stage_dir,
    write_json_atomic,
    write_stage_json,
)
from pipeline.config import PipelineConfig
from pipeline.data.prompts import prompt_text, read_prompts, split_prompts
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs
from pipeline.judge import NO_JUDGE, Judge, load_judge
from pipeline.modeling import check_context, is_local_reference
from pipeline.ppo.checkpoint import load_checkpoint, prune, rewrite_metrics, save_checkpoint, set_rng_state
from pipeline.ppo.control import AdaptiveKLController, FixedKLController, build_kl_controller
from pipeline.ppo.engines import build_rollout_engine, logprob_mismatch
from pipeline.ppo.evaluation import best_policy, detect_overoptimisation, evaluate_policies
from pipeline.ppo.losses import explained_variance
from pipeline.ppo.memory import peak_memory_gb, reset_peak_memory
from pipeline.ppo.optimise import NonFinite, build_optimizer, ppo_update
from pipeline.ppo.processes import all_gather_tensor, all_sum
from pipeline.ppo.ptx import PtxStream, load_corpus_texts
from pipeline.ppo.roles import POLICY, Roles, build_roles, save_adapter, save_critic
from pipeline.ppo.rollout import (
    PromptSampler,
    PromptSet,
    Rollout,
    RunningMoments,
    check_finite,
    collect_rollout,
    normalize_scores,
    prepare_prompts,
    rollout_means,
    score_rollout,
)
from pipeline.preemption import Preempted, preemption_requested
from pipeline.stages import stage_name
from pipeline.tracking import append_metrics, count_parameters, distributed_state, on_main, read_metrics

logger = logging.getLogger(__name__)

STAGE = "ppo"


# --------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PipelineConfig, round_no: int = 1) -> dict[str, str]:
    """base (the merged SFT model), reward (the same round's reward stage's final/), the prompt and ptx sources."""
    pcfg = cfg.ppo
    if pcfg.dataset is None:
        raise UserError(
            "ppo.dataset is not set: give a file, directory or Hub id of prompts (chat conversations, prompt/"
            "completion, Alpaca, HH pairs, UltraFeedback, OpenAssistant trees or rankings), or 'demo'"
        )
    inputs = (
        {"base": pcfg.policy_base}
        if pcfg.policy_base
        else {"base": str(final_dir(cfg, "sft") / "merged"), "sft": str(final_dir(cfg, "sft"))}
    )
    if pcfg.reward_model and cfg.rounds > 1:
        raise UserError(
            f"ppo.reward_model is set, but rounds={cfg.rounds}: each round trains its own reward model; leave "
            "ppo.reward_model unset (or set rounds: 1)"
        )
    inputs["reward"] = pcfg.reward_model or str(final_dir(cfg, stage_name("reward", round_no)))
    if demo.DEMO in (pcfg.dataset, pcfg.eval_dataset):
        inputs["world"] = str(cfg.run_path / "world")
    if pcfg.dataset != demo.DEMO:
        inputs["prompts"] = pcfg.dataset
    if pcfg.eval_dataset not in (None, demo.DEMO):
        inputs["eval_prompts"] = pcfg.eval_dataset
    if pcfg.ptx_coef > 0:
        inputs["ptx"] = pcfg.ptx_dataset or str(final_dir(cfg, "webtext"))
    return inputs


def _check_inputs(cfg: PipelineConfig, inputs: dict[str, str]) -> None:
    for role, stage in (("base", "sft"), ("reward", "reward")):
        path = Path(inputs[role])
        if is_local_reference(inputs[role]) and not path.exists():
            raise UserError(
                f"ppo.{'policy_base' if role == 'base' else 'reward_model'}: {path} does not exist "
                f"(run the {stage} stage first, or set the path)"
            )
    base = Path(inputs["base"])
    if (base / "config.json").is_file():
        from transformers import AutoConfig

        context = getattr(AutoConfig.from_pretrained(str(base)).get_text_config(), "max_position_embeddings", None)
        longest = cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens
        if context is not None and longest > context:
            raise UserError(
                f"ppo.max_prompt_len + ppo.max_new_tokens = {longest} exceeds the context of {base} "
                f"({context} tokens); lower one of them"
            )
    if cfg.ppo.reward_normalization == "reward_stats" and not (Path(inputs["reward"]) / "reward_stats.json").is_file():
        raise UserError(
            f"ppo.reward_normalization=reward_stats but {inputs['reward']} has no reward_stats.json; "
            "set ppo.reward_normalization=running (or none)"
        )


def load_prompt_sets(
    cfg: PipelineConfig, tokenizer: Any, reader: Any = None
) -> tuple[PromptSet, PromptSet, dict[str, Any]]:
    """(training prompts, evaluation prompts, what was read and skipped). The evaluation prompts are
    `ppo.eval_dataset`, or else `ppo.eval_share` of the training prompts, held out by a seeded hash. `reader`: the
    reward model's tokenizer where it reads the prompts as text with a template of its own."""
    pcfg = cfg.ppo
    files = demo.files(cfg) if demo.DEMO in (pcfg.dataset, pcfg.eval_dataset) else None
    source = files.ppo_train_prompts if pcfg.dataset == demo.DEMO else pcfg.dataset
    train, train_report = read_prompts(source, "ppo.dataset", pcfg.train_split)
    report = {"train": train_report.as_dict()}
    if pcfg.eval_dataset is None:
        train, heldout = split_prompts(train, pcfg.eval_share, cfg.seed)
        report["eval"] = {"held_out_of_train": len(heldout)}
        if not train or not heldout:
            raise UserError(
                f"ppo.dataset: {len(train) + len(heldout)} prompts are too few to hold out "
                "ppo.eval_share of them; give more prompts or set ppo.eval_dataset"
            )
    else:
        source = files.ppo_eval_prompts if pcfg.eval_dataset == demo.DEMO else pcfg.eval_dataset
        heldout, eval_report = read_prompts(source, "ppo.eval_dataset", pcfg.eval_split)
        report["eval"] = eval_report.as_dict()
    if pcfg.max_train_prompts > 0:
        train = train[: pcfg.max_train_prompts]
    if pcfg.eval_max_prompts > 0:
        heldout = heldout[: pcfg.eval_max_prompts]
    args = (tokenizer, pcfg.max_prompt_len, pcfg.long_prompts)
    train_set = prepare_prompts(train, *args, "ppo.dataset", reader)
    return train_set, prepare_prompts(heldout, *args, "ppo.eval_dataset", reader), report


# --------------------------------------------------------------------------------------------------------------
# Training state


@dataclass
class Training:
    """Everything an update changes besides the adapters, and a checkpoint restores."""

    optimizer: Any
    scheduler: Any
    kl_ctl: FixedKLController | AdaptiveKLController
    sampler: PromptSampler
    ptx: PtxStream | None
    running: RunningMoments = field(default_factory=RunningMoments)
    update: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # per update: scores of the policy that sampled it

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared state, this process's state) for a checkpoint."""
        shared = {
            "update": self.update,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "running_moments": self.running.state_dict(),
            "sampler": self.sampler.state_dict(),
            "history": self.history,
        }
        return shared, {"ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dicts(self, shared: dict[str, Any], own: dict[str, Any]) -> None:
        self.update, self.history = shared["update"], shared["history"]
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.kl_ctl.load_state_dict(shared["kl_controller"])
        self.running.load_state_dict(shared["running_moments"])
        self.sampler.load_state_dict(shared["sampler"])
        if self.ptx is not None:
            self.ptx.load_state_dict(own["ptx"])


def build_training(
    cfg: PipelineConfig, roles: Roles, prompts: PromptSet, inputs: dict[str, str], seed: int
) -> Training:
    pcfg, state = cfg.ppo, distributed_state()
    steps = pcfg.num_updates * pcfg.ppo_epochs * (pcfg.rollout_batch_size // pcfg.mini_batch_size)
    optimizer, scheduler = build_optimizer(pcfg, roles.policy_parameters(), roles.critic_parameters(), steps)
    ptx = None
    if pcfg.ptx_coef > 0:
        texts = on_main(lambda: load_corpus_texts(inputs["ptx"]))
        ptx = PtxStream(texts, roles.tokenizer, pcfg.ptx_seq_len, seed, state.process_index, state.num_processes)
    kl_ctl = build_kl_controller(pcfg.init_kl_coef, pcfg.kl_target, kl_horizon(pcfg))
    return Training(optimizer, scheduler, kl_ctl, PromptSampler(len(prompts.records), seed), ptx)


def kl_horizon(pcfg: Any) -> int:
    """ppo.kl_horizon, or a tenth of the run's episodes: the adaptive coefficient can then move by up to e^2 (x7.4 or
    /7.4) within the run, where a fixed 10,000 episodes (Ziegler et al.'s, for runs of millions) left it still."""
    if pcfg.kl_horizon is not None:
        return pcfg.kl_horizon
    return max(1, pcfg.num_updates * pcfg.rollout_batch_size // 10)


def resume(sdir: Path, roles: Roles, training: Training, seed: int, num_updates: int) -> Path | None:
    """Continue from the newest complete checkpoint, or seed each process's sampling for a fresh start."""
    state = distributed_state()
    checkpoint = newest_checkpoint(sdir)
    if checkpoint is None:
        torch.manual_seed(seed + 1000 * state.process_index)  # each process samples its own responses
        return None
    shared, own = load_checkpoint(checkpoint, roles)
    training.load_state_dicts(shared, own)
    set_rng_state(own["rng"])
    if state.is_main_process:  # forget what was logged after the checkpoint: it is about to happen again
        kept = [r for r in read_metrics(sdir / "metrics.jsonl") if r.get("update", 0) <= training.update]
        rewrite_metrics(sdir / "metrics.jsonl", kept)
    logger.info("resuming from %s (update %d of %d)", checkpoint, training.update, num_updates)
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# One update


def _local_indices(training: Training, pcfg: Any) -> list[int]:
    """This process's share of the next rollout batch: prompt indices, each repeated samples_per_prompt times in a
    row (a prompt's group stays on one process; the sampler advances identically everywhere)."""
    state = distributed_state()
    k = pcfg.samples_per_prompt
    per_process = pcfg.rollout_batch_size // k // state.num_processes
    indices = training.sampler.next_indices(pcfg.rollout_batch_size // k)
    mine = indices[state.process_index * per_process : (state.process_index + 1) * per_process]
    return [i for i in mine for _ in range(k)]


def _gold_scores(judge: Judge | None, rollout: Rollout) -> torch.Tensor | None:
    """The judge's score of every episode of the rollout (None without a judge)."""
    if judge is None:
        return None
    pairs = zip(rollout.records, rollout.texts, strict=True)
    return torch.tensor([judge.judge(prompt_text(r["prompt"]), t).score for r, t in pairs])


def _stop_nonfinite(sdir: Path, update: int, what: str) -> None:
    newest = newest_checkpoint(sdir)
    raise UserError(
        f"non-finite values ({what}) at update {update}: PPO stopped without saving; the last good "
        f"checkpoint is {newest or 'none (no checkpoint yet)'}. Lower ppo.learning_rate or raise "
        "ppo.init_kl_coef and start again with --rerun"
    )


def train_update(
    roles: Roles,
    training: Training,
    prompts: PromptSet,
    sampling: SamplingArgs,
    pcfg: Any,
    judge: Judge | None,
    sdir: Path,
    engine: Any = None,
) -> dict[str, Any]:
    """Sample a rollout batch, score it, run the PPO epochs over it; returns the update's logged record."""
    state = distributed_state()
    world = state.num_processes
    memory_kind = reset_peak_memory(state.device)
    rollout = collect_rollout(roles, prompts, _local_indices(training, pcfg), sampling, pcfg, state.device, engine)
    all_scores = all_gather_tensor(rollout.scores)
    if torch.isfinite(all_scores).all():
        training.running.update(all_scores)
    normalized = normalize_scores(rollout.scores, pcfg, roles.reward_stats, training.running)
    score_rollout(rollout, normalized, training.kl_ctl.value, pcfg)
    bad = check_finite(rollout)
    if all_sum({"bad": float(bad is not None)})["bad"] > 0:  # every process stops together
        _stop_nonfinite(sdir, training.update + 1, f"{bad or 'rollout'} of the rollout")
    started = time.perf_counter()
    try:
        stats = ppo_update(roles, rollout, pcfg, training.optimizer, training.scheduler, training.ptx, world)
    except NonFinite as exc:
        _stop_nonfinite(sdir, training.update + 1, str(exc))
    time_optimise = time.perf_counter() - started
    training.update += 1
    gold_scores = _gold_scores(judge, rollout)
    sums = rollout_means(rollout)
    sums["gold_sum"] = float(gold_scores.sum()) if gold_scores is not None else 0.0
    sums["gold_sq_sum"] = float((gold_scores**2).sum()) if gold_scores is not None else 0.0
    has_critic = roles.value_head is not None
    ev = explained_variance(rollout.values, rollout.returns, rollout.response_mask) if has_critic else 0.0
    sums["explained_variance"] = float(ev)
    sums = all_sum(sums)
    episodes, tokens = sums["episodes"], sums["tokens"]
    record = {
        "update": training.update,
        "episodes": training.update * pcfg.rollout_batch_size,
        "rm_score": sums["score_sum"] / episodes,
        "rm_score_normalized": sums["normalized_score_sum"] / episodes,
        "gold_score": sums["gold_sum"] / episodes if judge is not None else None,
        "kl": sums["kl_sum"] / episodes,
        "kl_coef": training.kl_ctl.value,
        "entropy": sums["entropy_token_sum"] / tokens,
        "response_length": sums["length_sum"] / episodes,
        "eos_rate": sums["eos_sum"] / episodes,
        "value_mean": sums["value_token_sum"] / tokens,
        "explained_variance": sums["explained_variance"] / world if has_critic else None,
        **stats,
        "learning_rate": training.scheduler.get_last_lr()[0],
        **rollout.timings,
        "time_optimise": time_optimise,
        "peak_memory_gb": peak_memory_gb(state.device),  # this process's (the main one's in the log)
        "peak_memory_kind": memory_kind,
    }
    if roles.reward_critic:  # the share of episodes whose critic states took a forward besides the scoring pass
        record["reward_states_recomputed"] = sums["recomputed_sum"] / episodes
    if rollout.engine_logprobs is not None:  # one process (build_rollout_engine): no all-reduce needed
        record.update(logprob_mismatch(rollout.logprobs, rollout.engine_logprobs, rollout.response_mask, pcfg.tis_cap))
    training.kl_ctl.update(record["kl"], pcfg.rollout_batch_size)
    training.history.append(
        {
            "update": training.update,
            "rm_score": record["rm_score"],
            "gold_score": record["gold_score"],
            "gold_sem": _sem(sums["gold_sum"], sums["gold_sq_sum"], episodes) if judge is not None else None,
        }
    )
    return record


def _log_update(sdir: Path, record: dict[str, Any], writer: Any) -> None:
    append_metrics(sdir / "metrics.jsonl", record)
    if writer is not None:
        for key, value in record.items():
            if key != "update" and isinstance(value, (int, float)):
                writer.add_scalar(f"ppo/{key}", value, record["update"])
        writer.flush()
    gold = "n/a" if record.get("gold_score") is None else f"{record['gold_score']:.3f}"
    logger.info(
        "update %d: score %.3f gold %s kl %.3f (coef %.4f) entropy %.3f clip %.3f approx_kl %.4f value_loss %.4f "
        "len %.1f eos %.2f | generate %.1fs score %.1fs optimise %.1fs",
        record["update"],
        record["rm_score"],
        gold,
        record["kl"],
        record["kl_coef"],
        record["entropy"],
        record["clip_fraction"],
        record["approx_kl"],
        record["value_loss"],
        record["response_length"],
        record["eos_rate"],
        record["time_generate"],
        record["time_score"],
        record["time_optimise"],
    )


# --------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, rerun: bool = False, round_no: int = 1) -> Path:
    """Train (or resume, or skip when finished with the same settings) the PPO policy of a round, always from the
    SFT policy; returns its `final/` (`ppo/final/`, `ppo-2/final/`, ...)."""
    started, stage = time.time(), stage_name(STAGE, round_no)
    # Under `accelerate launch` this joins the process group; on CPUs ACCELERATE_USE_CPU=true makes it gloo DDP.
    state = distributed_state()
    pcfg, sdir, world = cfg.ppo, stage_dir(cfg, stage), state.num_processes
    inputs = resolve_inputs(cfg, round_no)
    _check_inputs(cfg, inputs)
    if pcfg.rollout_batch_size % (world * pcfg.samples_per_prompt) or pcfg.mini_batch_size % world:
        raise UserError(
            f"ppo.rollout_batch_size ({pcfg.rollout_batch_size}) must be a multiple of the number of processes "
            f"({world}) times ppo.samples_per_prompt ({pcfg.samples_per_prompt}), and ppo.mini_batch_size "
            f"({pcfg.mini_batch_size}) of the number of processes"
        )
    identity, done = begin_stage(cfg, stage, inputs, rerun)
    if done is not None:
        return done

    check_context(pcfg.max_prompt_len + pcfg.max_new_tokens, inputs["base"], "ppo.max_prompt_len + ppo.max_new_tokens")
    seed = cfg.seed + pcfg.seed_offset
    torch.manual_seed(seed)  # the same fresh adapters on every process
    roles = build_roles(pcfg, inputs["base"], inputs["reward"], state.device)
    reader = roles.reward.tokenizer if pcfg.reward_input == "text" else None  # it renders the prompts itself
    if reader is not None and reader.chat_template == roles.tokenizer.chat_template:
        reader = None
    train_prompts, eval_prompts, prompt_report = on_main(lambda: load_prompt_sets(cfg, roles.tokenizer, reader))
    judge = load_judge(cfg)
    if judge is None:
        logger.info("ppo: %s", NO_JUDGE)
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k, pcfg.top_p, do_sample=True)
    _, total = count_parameters(roles.model)
    logger.info("ppo config: %s", pcfg)
    logger.info(
        "one base of %s parameters; %s trainable (policy and value adapters, value head); %d prompts "
        "(%d truncated, %d refused); %d processes",
        f"{total:,}",
        f"{sum(p.numel() for p in roles.trainable_parameters()):,}",
        len(train_prompts.records),
        train_prompts.truncated,
        train_prompts.refused,
        world,
    )
    training = build_training(cfg, roles, train_prompts, inputs, seed)
    resume(sdir, roles, training, seed, pcfg.num_updates)
    engine = build_rollout_engine(pcfg, roles, world)

    writer = None
    if state.is_main_process and pcfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(sdir / "tensorboard"), purge_step=training.update + 1)
    while training.update < pcfg.num_updates:
        record = train_update(roles, training, train_prompts, sampling, pcfg, judge, sdir, engine)
        if state.is_main_process:
            _log_update(sdir, record, writer)
        last = training.update == pcfg.num_updates
        preempted = preemption_requested()
        if training.update % pcfg.save_steps == 0 or last or preempted:
            save_checkpoint(sdir, training.update, roles, *training.state_dicts())
            if state.is_main_process:
                best = best_policy(_policy_scores(training.history, None), _saved(sdir))
                prune(sdir, pcfg.save_total_limit, sdir / f"checkpoint-{best['policy']}" if best else None)
        if preempted and not last:
            raise Preempted(f"pre-empted after update {training.update}; run the same command to resume")
    if writer is not None:
        writer.close()
    final_point = measure_policy(roles, training, train_prompts, sampling, pcfg, judge, engine)
    if engine is not None:
        engine.close()
    finish(
        cfg,
        roles,
        training,
        final_point,
        (train_prompts, eval_prompts, prompt_report),
        sampling,
        judge,
        identity,
        seed,
        started,
        stage,
    )
    return final_dir(cfg, stage)


def measure_policy(
    roles: Roles,
    training: Training,
    prompts: PromptSet,
    sampling: SamplingArgs,
    pcfg: Any,
    judge: Judge | None,
    engine: Any = None,
) -> dict[str, Any]:
    """Scores of the last policy, which has no rollout of its own: one more batch of training prompts, no update."""
    state = distributed_state()
    rollout = collect_rollout(roles, prompts, _local_indices(training, pcfg), sampling, pcfg, state.device, engine)
    gold_scores = _gold_scores(judge, rollout)
    sums = all_sum(
        {
            "score": float(rollout.scores.sum()),
            "n": float(len(rollout)),
            "gold": float(gold_scores.sum()) if gold_scores is not None else 0.0,
            "gold_sq": float((gold_scores**2).sum()) if gold_scores is not None else 0.0,
        }
    )
    if judge is None:
        return {"rm_score": sums["score"] / sums["n"], "gold_score": None, "gold_sem": None}
    gold_mean, sem = sums["gold"] / sums["n"], _sem(sums["gold"], sums["gold_sq"], sums["n"])
    return {"rm_score": sums["score"] / sums["n"], "gold_score": gold_mean, "gold_sem": sem}


def _sem(total: float, squares: float, n: float) -> float:
    """Standard error of a mean from the sum and the sum of squares of n values."""
    if n < 2:
        return 0.0
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return (variance / n) ** 0.5


def finish(
    cfg: PipelineConfig,
    roles: Roles,
    training: Training,
    final_point: dict[str, Any],
    prompts: tuple[PromptSet, PromptSet, dict[str, Any]],
    sampling: SamplingArgs,
    judge: Judge | None,
    identity: dict[str, Any],
    seed: int,
    started: float,
    stage: str = STAGE,
) -> None:
    """Evaluate SFT against PPO on held-out prompts, detect over-optimisation, and write final/ (main process)."""
    state, pcfg, sdir = distributed_state(), cfg.ppo, stage_dir(cfg, stage)
    train_prompts, eval_prompts, read_report = prompts
    digests = [_digest(roles.trainable_parameters())] * state.num_processes
    if state.num_processes > 1:
        torch.distributed.all_gather_object(digests, digests[0])
    if state.is_main_process:
        scores = _policy_scores(training.history, final_point)
        overopt = detect_overoptimisation(scores, pcfg.overopt_window, pcfg.overopt_tolerance)
        best = best_policy(scores, _saved(sdir))
        if overopt["detected"]:
            logger.warning(
                "over-optimisation detected at policy %d (gold %.3f -> %.3f while the reward model's score "
                "rose); the best checkpoint by gold score is %s",
                overopt["at_policy"],
                overopt["gold_before"],
                overopt["gold_after"],
                (best or {}).get("checkpoint"),
            )
        report, samples = evaluate_policies(roles, eval_prompts, sampling, pcfg, judge, state.device, seed)
        report["overoptimisation"] = {**overopt, "best": best, "policy_scores": scores}
        report["prompts"] = {
            "train": len(train_prompts.records),
            "train_truncated": train_prompts.truncated,
            "train_refused": train_prompts.refused,
            "train_unrenderable": train_prompts.unrenderable,
            "eval": len(eval_prompts.records),
            "eval_truncated": eval_prompts.truncated,
            "eval_refused": eval_prompts.refused,
            "eval_unrenderable": eval_prompts.unrenderable,
            "read": read_report,
        }
        metrics = _stage_metrics(report, training.history, sdir, state.num_processes, time.time() - started)
        metrics["prompts_read"] = read_report  # per source: read, kept, skipped by kind, the first skipped named
        if judge is None:
            metrics["judge"] = NO_JUDGE
        logger.info("ppo evaluation: %s", {k: v for k, v in metrics.items() if not k.startswith("time")})
        with finishing(cfg, stage) as out:
            save_adapter(roles.model, POLICY, out, roles.base_path)
            roles.tokenizer.save_pretrained(str(out))
            save_critic(roles, out / "value")
            write_json_atomic(out / "eval.json", report)
            (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            write_stage_json(out, identity, metrics, contents="adapter", extra={"rank_parameter_digests": digests})
    state.wait_for_everyone()


def _saved(sdir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(sdir)]


def _policy_scores(history: list[dict[str, Any]], final_point: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Scores per policy k (k = updates done; 0 = the SFT policy): the rollout of update k + 1 was sampled by it."""
    keys = ("rm_score", "gold_score", "gold_sem")
    points = [{"policy": h["update"] - 1, **{k: h.get(k) for k in keys}} for h in history]
    if final_point is not None:
        points.append({"policy": len(history), **final_point})
    return points


def _digest(params: list[torch.nn.Parameter]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _stage_metrics(
    report: dict[str, Any], history: list[dict[str, Any]], sdir: Path, world: int, seconds: float
) -> dict:
    records = read_metrics(sdir / "metrics.jsonl")
    metrics = {k: v for k, v in report.items() if not isinstance(v, (list, dict))}
    metrics.update(
        updates=len(history),
        world_size=world,
        stage_seconds=round(seconds, 2),
        overoptimised=report["overoptimisation"]["detected"],
        best_checkpoint=(report["overoptimisation"]["best"] or {}).get("checkpoint"),
        time_generate=round(sum(r.get("time_generate", 0.0) for r in records), 2),
        time_score=round(sum(r.get("time_score", 0.0) for r in records), 2),
        time_optimise=round(sum(r.get("time_optimise", 0.0) for r in records), 2),
    )
    return metrics
