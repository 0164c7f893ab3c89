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

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors.torch import load_file

from pipeline.checkpoints import (
    Preempted,
    final_dir,
    finishing,
    list_checkpoints,
    mark_checkpoint_complete,
    newest_checkpoint,
    preemption_requested,
    prepare_stage,
    stage_dir,
    stage_identity,
    write_json_atomic,
    write_stage_json,
)
from pipeline.config import PipelineConfig
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs
from pipeline.ppo.control import build_kl_controller
from pipeline.ppo.evaluation import best_policy, detect_overoptimisation, evaluate_policies, prompt_text
from pipeline.ppo.losses import clipped_policy_loss, clipped_value_loss, explained_variance, masked_mean
from pipeline.ppo.ptx import PtxStream, load_corpus_texts, pretraining_loss
from pipeline.ppo.roles import POLICY, VALUE, Roles, build_roles, load_adapter_weights, save_adapter
from pipeline.ppo.rollout import (
    PromptSampler,
    PromptSet,
    Rollout,
    RunningMoments,
    check_finite,
    collect_rollout,
    episode_inputs,
    load_prompt_records,
    normalize_scores,
    prepare_prompts,
    rollout_means,
    score_rollout,
)
from pipeline.tracking import append_metrics, count_parameters, read_metrics

logger = logging.getLogger(__name__)

STAGE = "ppo"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """base (the merged SFT model), reward (the reward stage's final/), and the prompt and ptx sources."""
    pcfg = cfg.ppo
    inputs = {"base": pcfg.policy_base} if pcfg.policy_base else {"base": str(final_dir(cfg, "sft") / "merged"),
                                                                  "sft": str(final_dir(cfg, "sft"))}  # fmt: skip
    inputs["reward"] = pcfg.reward_model or str(final_dir(cfg, "reward"))
    if pcfg.dataset == "demo" or pcfg.eval_dataset == "demo":
        inputs["world"] = str(cfg.run_path / "world")
    if pcfg.dataset != "demo":
        inputs["prompts"] = pcfg.dataset
    if pcfg.eval_dataset != "demo":
        inputs["eval_prompts"] = pcfg.eval_dataset
    if pcfg.ptx_coef > 0:
        inputs["ptx"] = pcfg.ptx_dataset or str(final_dir(cfg, "data"))
    return inputs


def _check_inputs(cfg: PipelineConfig, inputs: dict[str, str]) -> None:
    for role, stage in (("base", "sft"), ("reward", "reward")):
        path = Path(inputs[role])
        if (
            path.is_absolute() or path.exists() or str(path).startswith(".") or path.parent.exists()
        ) and not path.exists():
            raise UserError(f"ppo.{'policy_base' if role == 'base' else 'reward_model'}: {path} does not exist "
                            f"(run the {stage} stage first, or set the path)")  # fmt: skip
    base = Path(inputs["base"])
    if (base / "config.json").is_file():
        from transformers import AutoConfig

        context = getattr(AutoConfig.from_pretrained(str(base)).get_text_config(), "max_position_embeddings", None)
        longest = cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens
        if context is not None and longest > context:
            raise UserError(f"ppo.max_prompt_len + ppo.max_new_tokens = {longest} exceeds the context of {base} "
                            f"({context} tokens); lower one of them")  # fmt: skip
    if cfg.ppo.reward_normalization == "reward_stats" and not (Path(inputs["reward"]) / "reward_stats.json").is_file():
        raise UserError(f"ppo.reward_normalization=reward_stats but {inputs['reward']} has no reward_stats.json; "
                        "set ppo.reward_normalization=running (or none)")  # fmt: skip


def load_prompt_sets(cfg: PipelineConfig, tokenizer: Any) -> tuple[PromptSet, PromptSet, Any]:
    """(training prompts, evaluation prompts, gold scorer or None); the demo world supplies all three."""
    pcfg = cfg.ppo
    gold, files = None, None
    if pcfg.dataset == "demo" or pcfg.eval_dataset == "demo":
        from pipeline.data.gold import GoldScorer
        from pipeline.data.world import build_world, materialize

        files = materialize(cfg)
        gold = GoldScorer(build_world(cfg))
    if pcfg.dataset == "demo":
        train = load_prompt_records(files.ppo_train_prompts, "ppo.dataset")
    else:
        train = load_prompt_records(pcfg.dataset, "ppo.dataset", pcfg.train_split)
    if pcfg.eval_dataset == "demo":
        heldout = load_prompt_records(files.ppo_eval_prompts, "ppo.eval_dataset")
    else:
        heldout = load_prompt_records(pcfg.eval_dataset, "ppo.eval_dataset", pcfg.eval_split)
    if pcfg.max_train_prompts > 0:
        train = train[: pcfg.max_train_prompts]
    if pcfg.eval_max_prompts > 0:
        heldout = heldout[: pcfg.eval_max_prompts]
    args = (tokenizer, pcfg.max_prompt_len, pcfg.long_prompts)
    return prepare_prompts(train, *args, "ppo.dataset"), prepare_prompts(heldout, *args, "ppo.eval_dataset"), gold


# --------------------------------------------------------------------------------------------------------------
# Processes


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process and hand its result (or its UserError) to every rank."""
    state = PartialState()
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if state.num_processes > 1:
        box = [result, error]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise UserError(error)
    return result


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over processes."""
    if PartialState().num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of equal length from every process."""
    if PartialState().num_processes == 1:
        return tensor
    parts = [torch.zeros_like(tensor) for _ in range(PartialState().num_processes)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sync_gradients(params: list[torch.nn.Parameter], local_bad: bool) -> bool:
    """Average the gradients over processes with one all-reduce; True if any process saw a non-finite value."""
    world = PartialState().num_processes
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    flat = torch.cat([*grads, torch.tensor([1.0 if local_bad else 0.0], device=grads[0].device)])
    if world > 1:
        torch.distributed.all_reduce(flat)
        flat[:-1] /= world
    bad = bool(flat[-1] > 0) or not bool(torch.isfinite(flat[:-1]).all())
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    return bad


# --------------------------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(pcfg: Any, params: list[torch.nn.Parameter], total_steps: int) -> tuple[Any, Any]:
    import transformers

    # eps 1e-5: the PPO implementation detail of the original code (Huang et al. 2022, "37 details", item 3)
    optimizer = torch.optim.AdamW(params, lr=pcfg.learning_rate, eps=1e-5, weight_decay=pcfg.weight_decay)
    scheduler = transformers.get_scheduler(pcfg.lr_scheduler_type, optimizer, pcfg.warmup_steps, total_steps)
    return optimizer, scheduler


class NonFinite(Exception):
    """NaN or inf met during an update; the caller stops the run and keeps the last good checkpoint."""


def ppo_update(
    roles: Roles, rollout: Rollout, pcfg: Any, optimizer: Any, scheduler: Any, ptx: PtxStream | None, world: int
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in mini-batches, one optimiser step each; returns summed statistics."""
    params = roles.trainable_parameters()
    n = len(rollout)
    mb_local = pcfg.mini_batch_size // world
    micro = max(1, mb_local // pcfg.gradient_accumulation_steps)
    device = params[0].device
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0,
              "approx_kl": 0.0, "ptx_loss": 0.0, "steps": 0.0, "grad_norm": 0.0}  # fmt: skip
    stop = False
    for _ in range(pcfg.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, mb_local):
            batch = order[start : start + mb_local]
            stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0,
                     "approx_kl": 0.0, "ptx_loss": 0.0}  # fmt: skip
            bad = False
            for m_start in range(0, len(batch), micro):
                rows = batch[m_start : m_start + micro]
                weight = len(rows) / len(batch)
                ids, mask, p_len, r_len = episode_inputs(
                    rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, rows
                )
                ids, mask = ids.to(device), mask.to(device)
                resp_mask = rollout.response_mask[rows, :r_len].to(device)
                old = {
                    k: getattr(rollout, k)[rows, :r_len].to(device)
                    for k in ("logprobs", "advantages", "values", "returns")
                }
                logprobs, entropy = roles.policy_logprobs(ids, mask, p_len, pcfg.temperature, pcfg.entropy_coef > 0)
                pg_loss, clip_fraction, approx_kl = clipped_policy_loss(
                    logprobs, old["logprobs"], old["advantages"], resp_mask, pcfg.cliprange
                )
                loss = pg_loss - (pcfg.entropy_coef * masked_mean(entropy, resp_mask) if entropy is not None else 0.0)
                if ptx is not None:
                    ptx_loss = pretraining_loss(roles, ptx.next_batch(pcfg.ptx_batch_size).to(device))
                    loss = loss + pcfg.ptx_coef * ptx_loss
                    stats["ptx_loss"] += weight * float(ptx_loss)
                bad |= not bool(torch.isfinite(loss))
                (loss * weight).backward()
                values = roles.values(ids, mask, p_len)
                vf_loss, vf_clip = clipped_value_loss(
                    values, old["values"], old["returns"], resp_mask, pcfg.cliprange_value
                )
                bad |= not bool(torch.isfinite(vf_loss))
                (pcfg.vf_coef * vf_loss * weight).backward()
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_fraction),
                                   ("value_clip_fraction", vf_clip), ("approx_kl", approx_kl)):  # fmt: skip
                    stats[key] += weight * float(value.detach())
            if sync_gradients(params, bad):
                optimizer.zero_grad(set_to_none=True)
                raise NonFinite(f"policy loss {stats['policy_loss']:.4g}, value loss {stats['value_loss']:.4g}")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, pcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = all_sum(stats)
            for key, value in stats.items():
                totals[key] += value / world
            totals["grad_norm"] += float(grad_norm)
            totals["steps"] += 1
            if pcfg.max_approx_kl is not None and stats["approx_kl"] / world > pcfg.max_approx_kl:
                stop = True  # every process sees the same all-reduced value, so they stop together
                break
        if stop:
            break
    steps = max(totals.pop("steps"), 1.0)
    out = {key: value / steps for key, value in totals.items()}
    out["optimizer_steps"] = steps
    out["early_stopped"] = float(stop)
    return out


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    sdir: Path, update: int, roles: Roles, train_state: dict[str, Any], rank_state: dict[str, Any]
) -> Path:
    """Write checkpoint-<update>/ (adapters, head, trainer state, one file per process) and mark it complete."""
    state = PartialState()
    path = sdir / f"checkpoint-{update}"
    if state.is_main_process:
        if path.exists():  # an incomplete leftover of a crash (complete ones are never rewritten)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        save_adapter(roles.model, POLICY, path / "policy", roles.base_path)
        save_adapter(roles.critic, VALUE, path / "value", roles.base_path, head=roles.value_head)
        torch.save(train_state, path / "trainer_state.pt")
    state.wait_for_everyone()
    torch.save({**rank_state, "rng": _rng_state()}, path / f"rank_{state.process_index}.pt")
    state.wait_for_everyone()
    if state.is_main_process:
        mark_checkpoint_complete(path, update)
    state.wait_for_everyone()
    return path


def load_checkpoint(path: Path, roles: Roles) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put the checkpoint's adapters and head in place; return (trainer state, this process's state)."""
    state = PartialState()
    rank_file = path / f"rank_{state.process_index}.pt"
    if not rank_file.is_file():
        raise UserError(f"{path} was written by fewer processes than this run has ({state.num_processes}); "
                        "resume with the same number of processes, or use a new run_dir")  # fmt: skip
    load_adapter_weights(roles.model, POLICY, load_file(str(path / "policy" / "adapter_model.safetensors")))
    value = load_file(str(path / "value" / "adapter_model.safetensors"))
    load_adapter_weights(roles.critic, VALUE, {k: v for k, v in value.items() if "lora_" in k})
    with torch.no_grad():
        for key, param in roles.value_head.named_parameters():
            param.copy_(value[f"base_model.model.score.{key}"])
    train_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return train_state, rank_state


def prune(sdir: Path, keep: int, protect: Path | None) -> None:
    """Delete complete checkpoints beyond the newest `keep`, except `protect` (the best by gold score)."""
    complete = list_checkpoints(sdir)
    for path in complete[: -max(1, keep)]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The stage


def _log_update(sdir: Path, record: dict[str, Any], writer: Any) -> None:
    append_metrics(sdir / "metrics.jsonl", record)
    if writer is not None:
        for key, value in record.items():
            if key != "update" and isinstance(value, (int, float)):
                writer.add_scalar(f"ppo/{key}", value, record["update"])
        writer.flush()
    logger.info(
        "update %d: score %.3f gold %s kl %.3f (coef %.4f) entropy %.3f clip %.3f approx_kl %.4f value_loss %.4f "
        "len %.1f eos %.2f | generate %.1fs score %.1fs optimise %.1fs",
        record["update"], record["rm_score"], "n/a" if record.get("gold_score") is None else f"{record['gold_score']:.3f}",
        record["kl"], record["kl_coef"], record["entropy"], record["clip_fraction"], record["approx_kl"],
        record["value_loss"], record["response_length"], record["eos_rate"], record["time_generate"],
        record["time_score"], record["time_optimise"],
    )  # fmt: skip


def _gold_scores(gold: Any, rollout: Rollout) -> torch.Tensor | None:
    if gold is None:
        return None
    return torch.tensor(
        [gold.score(prompt_text(r["prompt"]), t) for r, t in zip(rollout.records, rollout.texts, strict=True)]
    )


def run(cfg: PipelineConfig, rerun: bool = False) -> Path:
    """Train (or resume, or skip when finished with the same settings); returns `run_dir/ppo/final/`."""
    started = time.time()
    # Under `accelerate launch` this joins the process group; on CPUs ACCELERATE_USE_CPU=true makes it gloo DDP.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    pcfg, sdir, world, rank = cfg.ppo, stage_dir(cfg, STAGE), state.num_processes, state.process_index
    inputs = resolve_inputs(cfg)
    _check_inputs(cfg, inputs)
    if pcfg.rollout_batch_size % world or pcfg.mini_batch_size % world:
        raise UserError(f"ppo.rollout_batch_size ({pcfg.rollout_batch_size}) and ppo.mini_batch_size "
                        f"({pcfg.mini_batch_size}) must be multiples of the number of processes ({world})")  # fmt: skip
    identity = stage_identity(cfg, STAGE, inputs)
    done = on_main(lambda: prepare_stage(cfg, STAGE, identity, rerun))
    if done is not None:
        logger.info("ppo already finished with these settings: %s", done)
        return done

    seed = cfg.seed + pcfg.seed_offset
    torch.manual_seed(seed)  # the same fresh adapters on every process
    roles = build_roles(pcfg, inputs["base"], inputs["reward"], state.device)
    train_prompts, eval_prompts, gold = on_main(lambda: load_prompt_sets(cfg, roles.tokenizer))
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k, pcfg.top_p, do_sample=True)
    _, total = count_parameters(roles.model)
    trainable = sum(p.numel() for p in roles.trainable_parameters())
    logger.info("ppo config: %s", pcfg)
    logger.info("one base of %s parameters; %s trainable (policy and value adapters, value head); %d prompts "
                "(%d truncated, %d refused); %d processes", f"{total:,}", f"{trainable:,}",
                len(train_prompts.records), train_prompts.truncated, train_prompts.refused, world)  # fmt: skip

    params = roles.trainable_parameters()
    steps_per_update = pcfg.ppo_epochs * (pcfg.rollout_batch_size // pcfg.mini_batch_size)
    optimizer, scheduler = build_optimizer(pcfg, params, pcfg.num_updates * steps_per_update)
    kl_ctl = build_kl_controller(pcfg.init_kl_coef, pcfg.kl_target, pcfg.kl_horizon)
    running = RunningMoments()
    sampler = PromptSampler(len(train_prompts.records), seed)
    ptx = None
    if pcfg.ptx_coef > 0:
        texts = on_main(lambda: load_corpus_texts(inputs["ptx"]))
        ptx = PtxStream(texts, roles.tokenizer, pcfg.ptx_seq_len, seed, rank, world)
    history: list[dict[str, Any]] = []  # per update: the scores of the policy that sampled its rollout
    update = 0
    checkpoint = newest_checkpoint(sdir)
    if checkpoint is not None:
        train_state, rank_state = load_checkpoint(checkpoint, roles)
        update = train_state["update"]
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        kl_ctl.load_state_dict(train_state["kl_controller"])
        running.load_state_dict(train_state["running_moments"])
        sampler.load_state_dict(train_state["sampler"])
        history = train_state["history"]
        if ptx is not None:
            ptx.load_state_dict(rank_state["ptx"])
        _set_rng_state(rank_state["rng"])
        if state.is_main_process:  # forget what was logged after the checkpoint: it is about to happen again
            kept = [r for r in read_metrics(sdir / "metrics.jsonl") if r.get("update", 0) <= update]
            _rewrite_metrics(sdir / "metrics.jsonl", kept)
        logger.info("resuming from %s (update %d of %d)", checkpoint, update, pcfg.num_updates)
    else:
        torch.manual_seed(seed + 1000 * rank)  # each process samples its own responses

    writer = None
    if state.is_main_process and pcfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(sdir / "tensorboard"), purge_step=update + 1)

    def snapshot() -> tuple[dict[str, Any], dict[str, Any]]:
        train_state = {"update": update, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "kl_controller": kl_ctl.state_dict(), "running_moments": running.state_dict(),
                       "sampler": sampler.state_dict(), "history": history}  # fmt: skip
        return train_state, {"ptx": ptx.state_dict() if ptx is not None else None}

    def stop_nonfinite(what: str) -> None:
        newest = newest_checkpoint(sdir)
        raise UserError(f"non-finite values ({what}) at update {update + 1}: PPO stopped without saving; the last good "
                        f"checkpoint is {newest or 'none (no checkpoint yet)'}. Lower ppo.learning_rate or raise "
                        "ppo.init_kl_coef and start again with --rerun")  # fmt: skip

    per_process = pcfg.rollout_batch_size // world
    while update < pcfg.num_updates:
        indices = sampler.next_indices(pcfg.rollout_batch_size)[rank * per_process : (rank + 1) * per_process]
        rollout = collect_rollout(roles, train_prompts, indices, sampling, pcfg, state.device)
        all_scores = all_gather_tensor(rollout.scores)
        if torch.isfinite(all_scores).all():
            running.update(all_scores)
        normalized = normalize_scores(rollout.scores, pcfg, roles.reward_stats, running)
        score_rollout(rollout, normalized, kl_ctl.value, pcfg)
        bad = check_finite(rollout)
        if all_sum({"bad": float(bad is not None)})["bad"] > 0:
            stop_nonfinite(f"{bad or 'rollout'} of the rollout")
        optimise_started = time.perf_counter()
        try:
            stats = ppo_update(roles, rollout, pcfg, optimizer, scheduler, ptx, world)
        except NonFinite as exc:
            stop_nonfinite(str(exc))
        time_optimise = time.perf_counter() - optimise_started
        update += 1
        gold_scores = _gold_scores(gold, rollout)
        sums = rollout_means(rollout)
        sums["gold_sum"] = float(gold_scores.sum()) if gold_scores is not None else 0.0
        sums["explained_variance"] = float(explained_variance(rollout.values, rollout.returns, rollout.response_mask))
        sums = all_sum(sums)
        episodes = sums["episodes"]
        kl = sums["kl_sum"] / episodes
        record = {
            "update": update,
            "episodes": update * pcfg.rollout_batch_size,
            "rm_score": sums["score_sum"] / episodes,
            "rm_score_normalized": sums["normalized_score_sum"] / episodes,
            "gold_score": sums["gold_sum"] / episodes if gold is not None else None,
            "kl": kl,
            "kl_coef": kl_ctl.value,
            "entropy": sums["entropy_token_sum"] / sums["tokens"],
            "response_length": sums["length_sum"] / episodes,
            "eos_rate": sums["eos_sum"] / episodes,
            "value_mean": sums["value_token_sum"] / sums["tokens"],
            "explained_variance": sums["explained_variance"] / world,
            **stats,
            "learning_rate": scheduler.get_last_lr()[0],
            "time_generate": rollout.timings["time_generate"],
            "time_score": rollout.timings["time_score"],
            "time_optimise": time_optimise,
        }
        kl_ctl.update(kl, pcfg.rollout_batch_size)
        history.append({"update": update, "rm_score": record["rm_score"], "gold_score": record["gold_score"]})
        if state.is_main_process:
            _log_update(sdir, record, writer)
        last = update == pcfg.num_updates
        preempted = preemption_requested()
        if update % pcfg.save_steps == 0 or last or preempted:
            save_checkpoint(sdir, update, roles, *snapshot())
            if state.is_main_process:
                best = best_policy(_policy_scores(history, None), _saved(sdir))
                prune(sdir, pcfg.save_total_limit, sdir / f"checkpoint-{best['policy']}" if best else None)
        if preempted and not last:
            raise Preempted(f"pre-empted after update {update}; run the same command to resume")
    if writer is not None:
        writer.close()

    # The last policy has no rollout of its own yet: measure it on one more batch of training prompts (no update).
    indices = sampler.next_indices(pcfg.rollout_batch_size)[rank * per_process : (rank + 1) * per_process]
    final_rollout = collect_rollout(roles, train_prompts, indices, sampling, pcfg, state.device)
    final_gold = _gold_scores(gold, final_rollout)
    final_sums = all_sum({"score": float(final_rollout.scores.sum()), "n": float(len(final_rollout)),
                          "gold": float(final_gold.sum()) if final_gold is not None else 0.0})  # fmt: skip
    final_point = {"rm_score": final_sums["score"] / final_sums["n"],
                   "gold_score": final_sums["gold"] / final_sums["n"] if gold is not None else None}  # fmt: skip
    digests = [_digest(params)] * world
    if world > 1:
        torch.distributed.all_gather_object(digests, digests[0])
    if state.is_main_process:
        scores = _policy_scores(history, final_point)
        overopt = detect_overoptimisation(scores, pcfg.overopt_window, pcfg.overopt_tolerance)
        best = best_policy(scores, _saved(sdir))
        report, samples = evaluate_policies(roles, eval_prompts, sampling, pcfg, gold, state.device, seed)
        report["overoptimisation"] = {**overopt, "best": best, "policy_scores": scores}
        report["prompts"] = {"train": len(train_prompts.records), "train_truncated": train_prompts.truncated,
                             "train_refused": train_prompts.refused, "eval": len(eval_prompts.records),
                             "eval_truncated": eval_prompts.truncated, "eval_refused": eval_prompts.refused}  # fmt: skip
        metrics = _stage_metrics(report, history, sdir, world, time.time() - started)
        with finishing(cfg, STAGE) as out:
            save_adapter(roles.model, POLICY, out, roles.base_path)
            roles.tokenizer.save_pretrained(str(out))
            save_adapter(roles.critic, VALUE, out / "value", roles.base_path, head=roles.value_head)
            write_json_atomic(out / "eval.json", report)
            _write_samples(out / "samples.jsonl", samples)
            write_stage_json(out, identity, metrics, contents="adapter", extra={"rank_parameter_digests": digests})
    state.wait_for_everyone()
    return final_dir(cfg, STAGE)


def _saved(sdir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(sdir)]


def _policy_scores(history: list[dict[str, Any]], final_point: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Scores per policy k (k = updates done; 0 = the SFT policy): the rollout of update k + 1 was sampled by it."""
    points = [{"policy": h["update"] - 1, "rm_score": h["rm_score"], "gold_score": h["gold_score"]} for h in history]
    if final_point is not None:
        points.append({"policy": len(history), **final_point})
    return points


def _digest(params: list[torch.nn.Parameter]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    os.replace(tmp, path)


def _write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    import json

    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


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
