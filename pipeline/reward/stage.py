"""Stage 3: a reward model from K-wise rankings with ties (C > B > A = D).

Reads the SFT stage's merged model (`sft/final/merged`, the base PPO uses too) and rankings: collected in the demo
(SFT samples and templated responses ranked by simulated annotators), or read from a file, directory or Hub dataset
in any of the formats of `pipeline/data/rankings.py` (rankings, pairs, scored completions, message trees, filled-in
ranking tasks). Trains a scalar head with LoRA (or QLoRA, or in full) using the transformers Trainer with our K-wise
loss as its one overridden hook: each prompt's K responses are scored in one forward pass and the Bradley-Terry loss
is averaged over that prompt's strictly ordered pairs (InstructGPT, Ouyang et al. 2022, eq. 1), so one prompt is one
batch element. Writes `reward/final/`: the adapter with the score head, the tokenizer, `reward_stats.json` (mean and
std of rewards on the SFT policy's responses, for PPO's reward normalisation), `eval.json` and `stage.json`.

    rlhf reward recipes/demo.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from pipeline import demo
from pipeline.checkpoints import (
    begin_stage,
    final_dir,
    finishing,
    newest_checkpoint,
    stage_dir,
    write_json_atomic,
    write_stage_json,
)
from pipeline.config import PipelineConfig
from pipeline.errors import UserError
from pipeline.modeling import build_scalar_model, check_context, default_dtype
from pipeline.preemption import raise_if_preempted
from pipeline.reward.data import (
    SPLITS,
    STAGE,
    RankingCollator,
    drop_unrenderable,
    encode_rankings,
    export_tasks,
    prepare_comparisons,
    read_split,
)
from pipeline.reward.evaluation import evaluate_reward_model, policy_reward_stats
from pipeline.reward.losses import centering_penalty, ranking_loss, scatter_rewards
from pipeline.stages import stage_name
from pipeline.tokenizer import load_tokenizer, prepare_chat_tokenizer
from pipeline.tracking import count_parameters, distributed_state, on_main
from pipeline.trainers import train_from, trainer_checkpoint_callback

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Training: the transformers Trainer with the K-wise loss


@dataclass(frozen=True)
class LossSettings:
    tie_model: str = "none"
    tie_probability: float = 1 / 3
    center_rewards_coefficient: float = 0.0


class RankingTrainer(transformers.Trainer):
    """transformers.Trainer whose one overridden hook, `compute_loss`, scores each prompt's K responses in one
    forward pass and applies `ranking_loss`; checkpoints, resume, DDP and logging are the Trainer's own."""

    loss_is_scaled_for_ga = False  # the loss is a mean over this micro-batch's prompts; the Trainer divides by GA
    loss_settings = LossSettings()  # set per run by `build_trainer`

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tiers, s = inputs["tiers"], self.loss_settings
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = scatter_rewards(out.logits.squeeze(-1).float(), tiers)
        loss = ranking_loss(rewards, tiers, inputs["margin"], s.tie_model, s.tie_probability)
        if s.center_rewards_coefficient:
            loss = loss + s.center_rewards_coefficient * centering_penalty(rewards, tiers)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """The Trainer's length-grouped sampler, but drawing its order from (seed, epoch) instead of the global RNG:
        a run resumed mid-epoch skips exactly the batches the interrupted one trained on (the Trainer fast-forwards
        the dataloader, and the stock sampler would shuffle with whatever the resumed process's RNG holds)."""
        sampler = super()._get_train_sampler(train_dataset)
        self._epoch_sampler = EpochSeededLengthGroupedSampler(
            sampler.batch_size, lengths=sampler.lengths, seed=self.args.seed
        )
        return self._epoch_sampler

    def _run_epoch(self, *args, epoch, **kwargs):
        # set here as well: accelerate's set_epoch does not reach a sampler under skip_first_batches with DDP
        if getattr(self, "_epoch_sampler", None) is not None:
            self._epoch_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler with its permutation a function of (seed, epoch) alone (the same on every
    rank and in every process)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def to_training_args(cfg: PipelineConfig, stage: str = STAGE) -> transformers.TrainingArguments:
    """The transformers TrainingArguments of this stage (checkpoint retention is ours: see trainers.py)."""
    return transformers.TrainingArguments(
        **cfg.reward.trainer_kwargs(str(stage_dir(cfg, stage)), cfg.seed),
        bf16=default_dtype() == torch.bfloat16,  # as in SFT: bf16 autocast on a GPU that has it
        prediction_loss_only=True,
        label_names=[],
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # our columns (K sequences per row, tiers, margin) are not forward() arguments
        train_sampling_strategy="group_by_length",  # shuffled, then sorted by length within mega-batches
        length_column_name="length",
    )


def build_trainer(
    cfg: PipelineConfig, model: Any, tokenizer: Any, train: list[dict], validation: list[dict], stage: str = STAGE
) -> RankingTrainer:
    rcfg = cfg.reward
    trainer = RankingTrainer(
        model=model,
        args=to_training_args(cfg, stage),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(validation) if validation and rcfg.eval_steps > 0 else None,
        data_collator=RankingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[trainer_checkpoint_callback(stage_dir(cfg, stage), rcfg.save_total_limit)],
    )
    trainer.loss_settings = LossSettings(rcfg.tie_model, rcfg.tie_probability, rcfg.center_rewards_coefficient)
    trainer.can_return_loss = True  # evaluation asks compute_loss for the loss although there are no labels
    return trainer


# --------------------------------------------------------------------------------------------------------------
# The stage


def resolve_inputs(cfg: PipelineConfig, round_no: int = 1) -> dict[str, str]:
    """The base model, the SFT stage it comes from (for the identity) and the data this stage reads; a later round
    also reads the previous round's comparisons and the previous PPO policy, whose responses it adds."""
    rcfg = cfg.reward
    inputs = (
        {"base": rcfg.base}
        if rcfg.base
        else {"base": str(final_dir(cfg, "sft") / "merged"), "sft": str(final_dir(cfg, "sft"))}
    )
    if rcfg.dataset is None:
        raise UserError(
            "reward.dataset is not set: give a rankings/pairs/scores/trees file, directory or Hub id, a filled-in "
            "ranking-tasks .csv, 'collect' (export ranking tasks for people) or 'demo'"
        )
    if rcfg.dataset == demo.DEMO:
        inputs["dataset"] = str(cfg.run_path / "world")
    elif rcfg.dataset == "collect":
        inputs["prompts"] = str(rcfg.collect.prompts)
    else:
        inputs["dataset"] = rcfg.dataset
    if round_no > 1:
        inputs["previous"] = str(final_dir(cfg, stage_name(STAGE, round_no - 1)))
        inputs["policy"] = str(final_dir(cfg, stage_name("ppo", round_no - 1)))
    return inputs


def run(cfg: PipelineConfig, rerun: bool = False, round_no: int = 1) -> Path:
    """Train (or resume, or skip when finished with the same settings) the reward model of a round; returns its
    `final/` (`reward/final/`, `reward-2/final/`, ...)."""
    started, state, stage = time.time(), distributed_state(), stage_name(STAGE, round_no)
    rcfg, sdir = cfg.reward, stage_dir(cfg, stage)
    inputs = resolve_inputs(cfg, round_no)
    if rcfg.dataset == "collect" and round_no == 1:
        on_main(lambda: export_tasks(cfg, inputs["base"]))
    identity, done = begin_stage(cfg, stage, inputs, rerun)
    if done is not None:
        return done
    base = inputs["base"]
    fitted = check_context(rcfg.max_seq_len, base, "reward.max_seq_len", clamp=True)
    if fitted != rcfg.max_seq_len:  # a copy: the stage's identity keeps the recipe's value
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(rcfg, max_seq_len=fitted))
        rcfg = cfg.reward
    data_summary = on_main(lambda: prepare_comparisons(cfg, base, round_no))
    tokenizer = load_tokenizer(base)
    prepare_chat_tokenizer(tokenizer)
    splits, data_summary["unrenderable"] = drop_unrenderable(
        {name: read_split(cfg, name, stage) for name in SPLITS}, tokenizer
    )
    train = encode_rankings(splits["train"], tokenizer, rcfg)
    data_summary["truncated_responses"] = sum(row["truncated"] for row in train)  # cut at reward.max_seq_len
    if data_summary["truncated_responses"]:
        logger.warning("reward: %d training responses cut at reward.max_seq_len", data_summary["truncated_responses"])
    if rcfg.tie_model == "none":  # a prompt whose responses are all tied has no pair to learn from
        train = [row for row in train if len(set(row["tiers"])) > 1]
    if not train:
        raise UserError(f"no training rankings with a strict pair in {rcfg.dataset} (every response tied?)")

    transformers.set_seed(cfg.seed)
    model = build_scalar_model(base, tokenizer, rcfg.finetune, rcfg.lora, rcfg.gradient_checkpointing)
    trainable, total = count_parameters(model)
    logger.info("reward config: %s", rcfg)
    logger.info(
        "reward model: %s parameters (%s trainable); %d training prompts, %d strict pairs",
        f"{total:,}",
        f"{trainable:,}",
        len(train),
        data_summary["pairs"]["train"],
    )
    trainer = build_trainer(
        cfg, model, tokenizer, train, encode_rankings(splits["validation"], tokenizer, rcfg), stage
    )
    checkpoint = newest_checkpoint(sdir)
    if checkpoint is not None:
        logger.info("resuming %s from %s", stage, checkpoint)
    train_started = time.time()
    output = train_from(trainer, checkpoint)
    train_seconds = time.time() - train_started
    raise_if_preempted(sdir)
    if state.is_main_process:
        model = trainer.model
        metrics: dict[str, Any] = {
            "train_loss": float(output.training_loss),
            "train_steps": trainer.state.global_step,
            "train_seconds": round(train_seconds, 2),
            "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else 0,
            "world_size": state.num_processes,
            "trainable_params": trainable,
            "total_params": total,
            "data": data_summary,
            "test": evaluate_reward_model(cfg, model, tokenizer, splits),
        }
        stats = policy_reward_stats(cfg, model, tokenizer, splits, base)
        metrics["reward_stats"] = stats
        _log_metrics(metrics)
        with finishing(cfg, stage) as out:
            model.save_pretrained(out)
            (out / "README.md").unlink(missing_ok=True)  # peft's placeholder card
            tokenizer.save_pretrained(out)
            write_json_atomic(out / "reward_stats.json", {"mean": stats["mean"], "std": stats["std"]})
            write_json_atomic(out / "eval.json", metrics["test"])
            metrics["stage_seconds"] = round(time.time() - started, 2)
            contents = "model" if rcfg.finetune == "full" else "adapter"
            write_stage_json(out, identity, metrics, contents=contents, extra={"finetune": rcfg.finetune})
    state.wait_for_everyone()
    return final_dir(cfg, stage)


def _log_metrics(metrics: dict[str, Any]) -> None:
    test = metrics["test"]
    for group, values in test.items():
        if isinstance(values, dict):
            logger.info(
                "reward %s: pairwise accuracy %.3f on %d pairs (length %.3f, keyword %.3f), Kendall tau %.3f, "
                "3-class accuracy %.3f, macro F1 %.3f",
                group,
                values["accuracy"],
                values["pairs"],
                values["baselines"]["length"],
                values["baselines"]["keyword"],
                values["kendall_tau"],
                values["judgement_accuracy"],
                values["judgement_macro_f1"],
            )
    logger.info(
        "reward stats on SFT responses: mean %.4f, std %.4f",
        metrics["reward_stats"]["mean"],
        metrics["reward_stats"]["std"],
    )
