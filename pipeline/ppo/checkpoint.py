"""PPO checkpoints: `checkpoint-<update>/` holds everything the next update depends on, so a run killed at any
point resumes exactly where it stood.

```
checkpoint-N/policy/            policy adapter (loadable with PeftModel.from_pretrained on the base)
checkpoint-N/value/             value adapter + head (a SEQ_CLS adapter, loadable like the reward model)
checkpoint-N/trainer_state.pt   update, optimiser, scheduler, KL controller, running score moments, prompt sampler,
                                per-policy score history
checkpoint-N/rank_<r>.pt        per process: RNG states (python, numpy, torch, CUDA) and the PPO-ptx stream position
checkpoint-N/checkpoint.done    written last: only then does resume consider the checkpoint
```
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import list_checkpoints, mark_checkpoint_complete
from pipeline.errors import UserError
from pipeline.ppo.roles import POLICY, Roles, load_adapter_weights, load_critic, save_adapter, save_critic
from pipeline.tracking import distributed_state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    sdir: Path, update: int, roles: Roles, train_state: dict[str, Any], rank_state: dict[str, Any]
) -> Path:
    """Write checkpoint-<update>/ (adapters, head, trainer state, one file per process) and mark it complete."""
    state = distributed_state()
    path = sdir / f"checkpoint-{update}"
    if state.is_main_process:
        if path.exists():  # an incomplete leftover of a crash (complete ones are never rewritten)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        save_adapter(roles.model, POLICY, path / "policy", roles.base_path)
        save_critic(roles, path / "value")
        torch.save(train_state, path / "trainer_state.pt")
    state.wait_for_everyone()
    torch.save({**rank_state, "rng": rng_state()}, path / f"rank_{state.process_index}.pt")
    state.wait_for_everyone()
    if state.is_main_process:
        mark_checkpoint_complete(path, update)
    state.wait_for_everyone()
    return path


def load_checkpoint(path: Path, roles: Roles) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put the checkpoint's adapters and head in place; return (trainer state, this process's state)."""
    state = distributed_state()
    rank_file = path / f"rank_{state.process_index}.pt"
    if not rank_file.is_file():
        raise UserError(
            f"{path} was written by fewer processes than this run has ({state.num_processes}); "
            "resume with the same number of processes, or use a new run_dir"
        )
    load_adapter_weights(roles.model, POLICY, load_file(str(path / "policy" / "adapter_model.safetensors")))
    load_critic(roles, path / "value")
    train_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return train_state, rank_state


def prune(sdir: Path, keep: int, protect: Path | None) -> None:
    """Delete complete checkpoints beyond the newest `keep`, except `protect` (the best by gold score)."""
    complete = list_checkpoints(sdir)
    for path in complete[: -max(1, keep)]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


def rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a metrics.jsonl with `records` (on resume: what was logged after the checkpoint is dropped)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    os.replace(tmp, path)
