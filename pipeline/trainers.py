"""What the transformers-Trainer stages (pretrain, SFT, reward) share: training resumed from a checkpoint, and the
callback that completes, prunes and logs checkpoints, stops on pre-emption and refuses to save diverged weights."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers

from pipeline.checkpoints import mark_checkpoint_complete, prune_checkpoints, write_json_atomic
from pipeline.errors import UserError
from pipeline.preemption import preemption_requested
from pipeline.tracking import append_metrics, distributed_state


def train_from(trainer: Any, checkpoint: Path | None) -> Any:
    """`trainer.train()`, resumed from `checkpoint` when there is one.

    A checkpoint written at the last step (the run died between it and `final/`) is loaded, not trained on: the
    transformers Trainer (5.x) resumed at `max_steps` runs one step more, so the result would differ from the
    uninterrupted run's.
    """
    running = {}
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "running"):
            callback.trainer = trainer
            running = callback.running = read_running_metrics(checkpoint, trainer.args.process_index)
    if checkpoint is not None:
        state = transformers.TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if 0 < state.max_steps <= state.global_step:
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = state
            restore_running_metrics(trainer, running)
            loss = (running.get("total_loss", 0.0) + running.get("tr_loss", 0.0)) / max(state.global_step, 0.001)
            # the metrics the Trainer's last log gives (trl adds its running means, the Trainer the epoch)
            metrics = {f"train_{k}": 0.0 for k in ("runtime", "samples_per_second", "steps_per_second")}
            metrics.update(total_flos=state.total_flos, train_loss=loss)
            trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)  # as train() leaves it (DDP too)
            trainer.model.train()  # trl's log reads the mode from the model, as at the end of training
            trainer.log(metrics)
            return transformers.trainer_utils.TrainOutput(state.global_step, loss, metrics)
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


RUNNING = "running_metrics_{rank}.json"


def read_running_metrics(checkpoint: Path | None, rank: int) -> dict[str, Any]:
    """What a checkpoint holds of this rank's running sums (empty without a checkpoint, or from an older one)."""
    path = checkpoint / RUNNING.format(rank=rank) if checkpoint is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def save_running_metrics(trainer: Any, checkpoint: Path) -> None:
    """The Trainer's running sums as they stand at a save: the loss drained at logging steps, the loss accumulated
    since the last log (a float32 tensor, stored exactly), and trl's count of training tokens."""
    running = {
        "total_loss": trainer._total_loss_scalar,
        "tr_loss": trainer._tr_loss.item(),
        "last_logged_step": trainer._globalstep_last_logged,
    }
    if hasattr(trainer, "_total_train_tokens"):
        running["train_tokens"] = trainer._total_train_tokens
    if isinstance(getattr(trainer, "_metrics", None), dict):  # trl's metrics gathered since the last log
        running["trl_metrics"] = {mode: {k: list(v) for k, v in m.items()} for mode, m in trainer._metrics.items()}
    write_json_atomic(checkpoint / RUNNING.format(rank=trainer.args.process_index), running)


def restore_running_metrics(trainer: Any, running: dict[str, Any]) -> None:
    """Continue the running sums of the interrupted run, so that `train_loss` is the mean over every step (not over
    the resumed ones) and trl's token count covers the whole run, as in an uninterrupted run, bit for bit."""
    if not running:
        return
    trainer._total_loss_scalar = running["total_loss"]
    trainer._tr_loss = torch.tensor(running["tr_loss"], dtype=torch.float32, device=trainer.args.device)
    trainer._globalstep_last_logged = running["last_logged_step"]
    trainer._initial_global_step = 0  # train_loss = the sums / every step, not the resumed ones
    if "train_tokens" in running:
        trainer._total_train_tokens = running["train_tokens"]
    for mode, values in running.get("trl_metrics", {}).items():
        trainer._metrics[mode] = collections.defaultdict(list, values)


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
        trainer: Any = None  # set by `train_from`
        running: dict[str, Any] = {}  # the running sums of the checkpoint resumed from

        def on_train_begin(self, args, state, control, **kwargs):
            if self.trainer is not None:  # after the Trainer reset its sums for this train() call
                restore_running_metrics(self.trainer, self.running)

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
            if self.trainer is not None:
                save_running_metrics(self.trainer, sdir / f"checkpoint-{state.global_step}")
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
