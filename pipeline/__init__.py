"""An LLM alignment pipeline: web-text pretraining, LoRA SFT, a reward model from rankings with ties, and PPO."""

__version__ = "0.1.0"
