"""What the transformers-Trainer stages (pretrain, SFT, reward) share: training resumed from a checkpoint, and the
callback that completes, prunes and logs checkpoints, stops on pre-emption and refuses to save diverged weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import transformers

from pipeline.checkpoints import mark_checkpoint_complete, prune_checkpoints
from pipeline.errors import UserError
from pipeline.preemption import preemption_requested
from pipeline.tracking import append_metrics, distributed_state


def train_from(trainer: Any, checkpoint: Path | None) -> Any:
    """`trainer.train()`, resumed from `checkpoint` when there is one.

    A checkpoint written at the last step (the run died between it and `final/`) is loaded, not trained on: the
    transformers Trainer (5.x) resumed at `max_steps` runs one step more, so the result would differ from the
    uninterrupted run's.
    """
    if checkpoint is not None:
        state = transformers.TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if 0 < state.max_steps <= state.global_step:
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = state
            losses = [r["loss"] for r in state.log_history if "loss" in r]  # the logged ones: an approximation
            loss = sum(losses) / len(losses) if losses else float("nan")
            return transformers.trainer_utils.TrainOutput(state.global_step, loss, {"train_loss": loss})
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "diverged", None):
            step, what = callback.diverged
            stage = Path(trainer.args.output_dir).name
            raise UserError(
                f"{stage}: training diverged at step {step} ({what} is NaN or inf); the checkpoints before it are "
                f"kept and no result was written: lower {stage}.learning_rate (or {stage}.max_grad_norm) and run "
                "again with --rerun"
            )
    return output


def trainer_checkpoint_callback(sdir: Path, keep: int) -> Any:
    """A transformers TrainerCallback for the Trainer-based stages.

    It marks each checkpoint complete once every rank wrote its part (so a crash mid-save never breaks resume), keeps
    the newest `keep` complete ones (the Trainer's own `save_total_limit` must be off: it rotates before a checkpoint
    is complete), logs metrics to `sdir/metrics.jsonl`, and on pre-emption saves a checkpoint and stops training
    (the stage then calls `raise_if_preempted`). Training that diverges (a logged loss or gradient norm, or a
    trainable weight about to be saved, is NaN or inf) stops without saving; `train_from` then raises.
    """

    class TrainerCheckpointCallback(transformers.TrainerCallback):
        diverged: tuple[int, str] | None = None  # (step, what) once something is not finite

        def _stop(self, control, step: int, what: str) -> None:
            self.diverged = self.diverged or (step, what)
            control.should_save = False
            control.should_training_stop = True

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if preemption_requested():
                control.should_save = True
                control.should_training_stop = True
            if control.should_save and model is not None:
                bad = next(
                    (n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()), None
                )
                if bad is not None:  # never write a checkpoint (or a result) with broken weights
                    self._stop(control, state.global_step, f"the weight {bad}")

        def on_save(self, args, state, control, **kwargs):
            distributed_state().wait_for_everyone()  # each rank writes its own RNG state into the checkpoint
            if state.is_world_process_zero:
                mark_checkpoint_complete(sdir / f"checkpoint-{state.global_step}", state.global_step)
                prune_checkpoints(sdir, keep)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                append_metrics(sdir / "metrics.jsonl", {"step": state.global_step, **logs})
            for key in ("loss", "grad_norm"):  # the same on every rank (DDP averages them)
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    self._stop(control, state.global_step, f"the {key.replace('_', ' ')}")

    return TrainerCheckpointCallback()
