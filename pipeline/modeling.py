"""Building models: pretraining presets, loading a base (optionally 4-bit), LoRA adapters, scalar-head models.

Each section below belongs to the stage that introduced it; later stages reuse what is here rather than re-loading
models their own way.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Pretraining: Llama size presets and models built from a config


# ---------------------------------------------------------------------------------------------------------------
# Loading a base causal LM (local path or Hub id, optionally 4-bit NF4) and LoRA adapters


# ---------------------------------------------------------------------------------------------------------------
# Scalar-head models: reward model and value model
