"""Stage 4: PPO against the reward model (see pipeline/ppo/loop.py); `run` and `resolve_inputs` are the stage API."""

from pipeline.ppo.loop import resolve_inputs, run

__all__ = ["resolve_inputs", "run"]
