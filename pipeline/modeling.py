"""Building models: pretraining presets, loading a base (optionally 4-bit), LoRA adapters, scalar-head models.

Each section below belongs to the stage that introduced it; later stages reuse what is here rather than re-loading
models their own way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.config import LoraArgs, ModelArgs
from pipeline.data.records import BadRecord
from pipeline.errors import UserError
from pipeline.generation import mixed_precision, tokenize_prompts
from pipeline.tokenizer import end_ids, load_tokenizer, pad_candidate, render_with_masks, turn_end_token

logger = logging.getLogger(__name__)

# peft's get_peft_model reads transformers 5's deprecated `is_gradient_checkpointing`: two lines of FutureWarning on
# stderr in every stage that puts on an adapter, before any one-line error (not ours to act on)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# ---------------------------------------------------------------------------------------------------------------
# Pretraining: Llama size presets and models built from a config

# Sizes of the Llama models pretrained from scratch. The names count non-embedding parameters roughly (the
# embeddings add vocab_size * hidden_size, twice when untied). tiny/mini/small are for CPUs; 125m follows GPT-3
# Small's shape, 1b follows Llama-3.2-1B (grouped-query attention, tied embeddings). tiny is the CPU demo's model:
# on the demo crawl, 6 narrow layers learnt the crawl's facts (cloze probes) more reliably than 2 or 4 wider ones
# of similar cost, and untied embeddings more reliably than tied ones.
PRESETS: dict[str, dict[str, int | bool]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=384, tie_word_embeddings=False),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=768, tie_word_embeddings=True),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                  intermediate_size=1024, tie_word_embeddings=True),
    "20m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1536, tie_word_embeddings=False),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, tie_word_embeddings=False),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
}  # fmt: skip


def build_llama_config(args: ModelArgs, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> LlamaConfig:
    """A Llama config from a size preset, the explicit overrides in `args`, and the tokenizer's special tokens."""
    sizes = dict(PRESETS[args.preset])
    for name in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "tie_word_embeddings",
    ):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if args.num_attention_heads is not None and args.num_key_value_heads is None:
        sizes["num_key_value_heads"] = args.num_attention_heads
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise UserError(
            f"pretrain.model: hidden_size {sizes['hidden_size']} is not divisible by num_attention_heads "
            f"{sizes['num_attention_heads']} (choose sizes where it is)"
        )
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise UserError(
            f"pretrain.model: num_attention_heads {sizes['num_attention_heads']} is not divisible by "
            f"num_key_value_heads {sizes['num_key_value_heads']} (grouped-query attention needs it)"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=args.max_position_embeddings or max_seq_len,
        rope_theta=args.rope_theta,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=False,  # training only; generation turns it back on
        **sizes,
    )


def build_pretrain_model(
    args: ModelArgs, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, init_from: str | None = None
) -> PreTrainedModel:
    """A fresh Llama from `args` (seed the RNG first), or the causal LM at `init_from` for continued pretraining.

    The embeddings are resized when the tokenizer is larger than the model's vocabulary (tokens added by
    `prepare_chat_tokenizer`). Generation settings (EOS, pad) come from the tokenizer.
    """
    if init_from is None:
        model = LlamaForCausalLM(build_llama_config(args, tokenizer, max_seq_len))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"pretrain.init_from: cannot load a causal LM from {init_from}: {str(exc).splitlines()[0]} "
                "(give a directory saved with save_pretrained or a Hub id reachable from this machine)"
            ) from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.use_cache = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward and backward through N non-embedding weights) + attention scores.

    As in the PaLM paper (Chowdhery et al. 2022, appendix B): 6 N + 12 L d T, with L layers, width d, sequence T.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    attn = d * d * 2 + d * kv_heads * head_dim * 2  # q, o and k, v projections
    mlp = 3 * d * config.intermediate_size
    n = layers * (attn + mlp) + d * config.vocab_size  # the LM head is a matmul too
    return 6.0 * n + 12.0 * layers * d * seq_len


# ---------------------------------------------------------------------------------------------------------------
# Loading a base causal LM (local path or Hub id, optionally 4-bit NF4) and LoRA adapters

# What `save_pretrained` writes for the weights (single file or sharded index), in the order transformers looks.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_local_reference(name_or_path: str | Path) -> bool:
    """True when `name_or_path` names a local path rather than a Hub id (`org/name`)."""
    text = str(name_or_path)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def check_model_source(name_or_path: str | Path, what: str = "base model") -> str:
    """Fail in one line on a local path that does not hold model weights; Hub ids pass through unchanged."""
    text = str(name_or_path)
    if not is_local_reference(text):
        return text
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} not found: {path} (give a directory saved with save_pretrained, or a Hub id)")
    if not (path / "config.json").is_file() or not any((path / name).is_file() for name in WEIGHT_FILES):
        if (path / "adapter_config.json").is_file():
            raise UserError(
                f"{what} {path} holds a LoRA adapter, not full weights (use its merged/ directory as the base)"
            )
        raise UserError(
            f"{what} {path} has no model weights (expected config.json and one of {', '.join(WEIGHT_FILES)})"
        )
    return str(path)


def default_dtype() -> torch.dtype:
    """bfloat16 on a GPU that supports it, float32 otherwise (CPUs train and merge in full precision)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def nf4_config(compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    """QLoRA's quantisation (Dettmers et al. 2023): 4-bit NormalFloat weights, double-quantised constants."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or default_dtype(),
    )


def load_base_model(
    name_or_path: str | Path,
    model_class: type = AutoModelForCausalLM,
    quantize_4bit: bool = False,
    random_init: bool = False,
    dtype: torch.dtype | None = None,
    what: str = "base model",
    **model_kwargs: Any,
) -> PreTrainedModel:
    """Load a model by local path or Hub id: in full precision, as 4-bit NF4 (QLoRA), or with fresh random weights.

    Args:
        model_class: the Auto class, e.g. `AutoModelForCausalLM` or `AutoModelForSequenceClassification` (then pass
            `num_labels=1` in `model_kwargs`).
        random_init: same architecture, randomly initialised (seed first): a control that skips pretraining.
        what: how the error messages name the model (e.g. "sft.base").
    """
    source = check_model_source(name_or_path, what)
    dtype = dtype or default_dtype()
    try:
        if random_init:
            config = AutoConfig.from_pretrained(source)
            for key, value in model_kwargs.items():
                setattr(config, key, value)
            model = model_class.from_config(config, dtype=dtype)
        elif quantize_4bit:
            model = _from_pretrained(
                model_class,
                source,
                what,
                quantization_config=nf4_config(dtype),
                dtype=dtype,
                device_map={"": _local_device()},
                **model_kwargs,
            )
            keep_4bit_layers_differentiable(model)
        else:
            model = _from_pretrained(model_class, source, what, dtype=dtype, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load {what} from {source}: {str(exc).splitlines()[0]} "
            "(give a directory saved with save_pretrained or a Hub id reachable from this machine)"
        ) from None
    return model


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's `Linear4bit` repacks its weights the first time it runs in eval mode
    without grad (generation, scoring, evaluation), for good. Every later forward, training included, then goes
    through `gemv_4bit`, which has no backward: the gradient through the frozen base layers is dropped without an
    error, so adapters below the top layer learn from part of their gradient. Saving a `state_dict` unpacks them again,
    so a run's numerics came to depend on when it last checkpointed, and a resumed run drifted from an unbroken one.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class _NoLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT table; `_from_pretrained` says what matters in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _from_pretrained(model_class: type, source: str, what: str, **kwargs: Any) -> PreTrainedModel:
    """`from_pretrained`, with the weights it did not find or did not use told in one warning line.

    A causal-LM checkpoint loaded as a sequence-classification model always lacks the new `score` head and leaves
    `lm_head` unused: that is the design (the head is trained), so only other differences are reported."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(quiet)
    expected_new = (SCORE_HEAD,) if model_class is AutoModelForSequenceClassification else ()
    expected_unused = ("lm_head",) if expected_new else ()
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] not in expected_new]
    unused = [k for k in info.get("unexpected_keys", ()) if k.split(".")[0] not in expected_unused]
    for keys, told in ((missing, "not in the checkpoint, newly initialised"), (unused, "in the checkpoint, unused")):
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            logger.warning("%s (%s): %d weights %s: %s", what, source, len(keys), told, shown)
    return model


def _local_device() -> str | int:
    """This process's device for 4-bit loading (bitsandbytes places weights at load time)."""
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return "cpu"


def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Resize the embeddings to the tokenizer and copy its EOS/pad ids into the configs; True if the vocab grew."""
    grew = len(tokenizer) > model.get_input_embeddings().num_embeddings
    if grew:
        # mean_resizing: new rows start at the mean embedding, so added tokens do not dominate the softmax
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    ends = end_ids(tokenizer, model)  # the template's end of turn and the generation config's end ids stay
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = ends if len(ends) > 1 else ends[0]
    return grew


def model_context(config: PretrainedConfig) -> int | None:
    """The longest sequence a model's positions cover (`max_position_embeddings`, `n_positions`, ...), if it says."""
    text = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(length: int, base: str | Path, key: str, clamp: bool = False) -> int:
    """`length` (the setting `key`) checked against the context of the model at `base` before anything trains (a
    longer sequence would index past the position table: an IndexError). Beyond it: a one-line error, or with
    `clamp` (a length that only caps truncation: reward inputs) the context, with a warning. Returns the length."""
    try:
        context = model_context(AutoConfig.from_pretrained(str(base)))
    except (OSError, ValueError):
        return length  # the model's own loading reports a missing or broken config
    if context is None or length <= context:
        return length
    if clamp:
        logger.warning("%s = %d exceeds the context of %s; sequences are cut at %d", key, length, base, context)
        return context
    raise UserError(
        f"{key} = {length} exceeds the context of {base} ({context} positions); lower it to at most {context}"
    )


def lm_logits(model: PreTrainedModel, states: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states, then what the family's forward does after its head: Gemma 2/3 soft-cap the
    logits (`cap * tanh(logits / cap)`, config `final_logit_softcapping`), Cohere multiplies them by `logit_scale`,
    Granite divides them by `logits_scaling`. Log-probs computed from these equal those `generate` samples from."""
    logits = model.get_output_embeddings()(states)
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    return logits


def embedding_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the input embeddings and the LM head (e.g. ['embed_tokens', 'lm_head']), for modules_to_save."""
    wanted = [model.get_input_embeddings()]
    if model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    names = []
    for module in wanted:
        for name, candidate in model.named_modules():
            if candidate is module:
                names.append(name.rsplit(".", 1)[-1])
                break
    return list(dict.fromkeys(names))


def build_lora_config(
    args: LoraArgs,
    model: PreTrainedModel,
    task_type: str = "CAUSAL_LM",
    train_embeddings: bool = False,
    trainable_token_ids: list[int] | None = None,
) -> peft.LoraConfig:
    """A `peft.LoraConfig` from `LoraArgs`.

    Args:
        task_type: peft task, "CAUSAL_LM" (policy) or "SEQ_CLS" (reward/value; peft then saves the score head).
        train_embeddings: also train and save the input embeddings and LM head in full (tokens were added, so their
            new rows must be learnt and shipped with the adapter).
        trainable_token_ids: train just these rows of the input embeddings (and of a tied LM head), e.g. chat role
            tokens that a pretrained base has never seen: the embeddings are saved with the adapter, and
            `apply_lora` masks the gradient of every other row (with weight_decay 0 they stay exactly as they were).
    """
    targets: str | list[str] = "all-linear" if args.target_modules == ["all-linear"] else list(args.target_modules)
    to_save = list(args.modules_to_save)
    if train_embeddings or trainable_token_ids:
        to_save += [name for name in embedding_module_names(model) if name not in to_save]
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return peft.LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        task_type=task_type,
        # tied input/output embeddings stay one matrix when both are trained (otherwise peft would untie them)
        ensure_weight_tying=tied and bool(to_save),
    )


def apply_lora(
    model: PreTrainedModel,
    args: LoraArgs,
    task_type: str = "CAUSAL_LM",
    train_embeddings: bool = False,
    gradient_checkpointing: bool = False,
    trainable_token_ids: list[int] | None = None,
    key: str = "lora",
) -> peft.PeftModel:
    """Wrap `model` with fresh LoRA adapters (seed first); a 4-bit model is prepared for k-bit training first.

    `key` names the recipe section in errors ("sft.lora"): a module name in it that matches no module of the model is
    a one-line error (peft ignores such a `modules_to_save` name, and a `target_modules` name beside a matching one)."""
    check_lora_modules(model, args, key)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # casts norms to fp32 and makes the inputs require grad, so gradients reach the adapters through frozen layers
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    names = embedding_module_names(model)
    rows_only = bool(trainable_token_ids) and not train_embeddings and not set(names) & set(args.modules_to_save)
    config = build_lora_config(args, model, task_type, train_embeddings, trainable_token_ids if rows_only else None)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"{key}.target_modules {args.target_modules}: {str(exc).splitlines()[0]}") from None
    if rows_only:
        train_only_rows(wrapped, names, trainable_token_ids)
    return wrapped


def check_lora_modules(model: PreTrainedModel, args: LoraArgs, key: str) -> None:
    """Each name of `target_modules` and `modules_to_save` matches a module of `model`, as peft matches them (a
    target: the full name or its last parts; a module to save: any end of the name), else a one-line error naming
    the key, the name, and names the model does have (a misspelt name would train less than asked, silently)."""
    modules = [name for name, _ in model.named_modules() if name]
    targets = [] if args.target_modules == ["all-linear"] else args.target_modules
    for field, wanted, found in (
        ("target_modules", targets, lambda w: any(n == w or n.endswith(f".{w}") for n in modules)),
        ("modules_to_save", args.modules_to_save, lambda w: any(n.endswith(w) for n in modules)),
    ):
        missing = [w for w in wanted if not found(w)]
        if missing:
            fix = "use names it has, or 'all-linear'" if field == "target_modules" else "use names it has"
            raise UserError(
                f"{key}.{field}: {', '.join(map(repr, missing))} matches no module of the model (it has "
                f"{_module_examples(model)}); {fix}"
            )


def _module_examples(model: PreTrainedModel, n: int = 8) -> str:
    """The first `n` distinct short names of the model's modules that hold weights, and how many more: its
    embeddings and LM head first (what modules_to_save names), then the layers in order (what target_modules names)."""
    names = embedding_module_names(model)
    for name, module in model.named_modules():
        if name and next(module.parameters(recurse=False), None) is not None:
            names.append(name.rsplit(".", 1)[-1])
    names = list(dict.fromkeys(names))
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def train_only_rows(model: peft.PeftModel, module_names: list[str], rows: list[int]) -> None:
    """Mask the gradient of the trained embedding copies (modules_to_save) to `rows`.

    peft's own `trainable_token_indices` wraps a tied LM head in a module trl's fused loss cannot read, so the rows are
    trained through the full copies instead, with a gradient hook.
    """
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, peft.utils.ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in module_names:
            weight = module.modules_to_save[model.active_adapter].weight
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
            mask[torch.as_tensor(rows, device=weight.device)] = True
            # the weight may be cast after this (bf16 on a GPU), so the gradient keeps its own dtype
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))


def merge_lora(
    model: peft.PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    base: str | Path | None = None,
    model_class: type = AutoModelForCausalLM,
    **model_kwargs: Any,
) -> Path:
    """Fold the trained adapters of `model` into its base; save full weights and the tokenizer to `out_dir`.

    A plain model is merged in place (it cannot be used as a PeftModel afterwards). A 4-bit model (QLoRA) is merged
    into a dequantised copy: `base` is loaded in 4-bit exactly as in training and dequantised, so the merged weights
    are the ones the adapters were trained against, not the original full-precision ones.
    """
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        if base is None:
            raise ValueError("merging a 4-bit model needs the base it was loaded from")
        state = peft.get_peft_model_state_dict(model)
        config = model.peft_config[model.active_adapter]
        fresh = load_base_model(base, model_class, quantize_4bit=True, dtype=torch.float32, **model_kwargs)
        fresh = fresh.dequantize(dtype=torch.float32)
        fit_model_to_tokenizer(fresh, tokenizer)
        model = peft.get_peft_model(fresh, config)
        peft.set_peft_model_state_dict(model, state)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Scalar-head models: reward model and value model

SCORE_HEAD = "score"  # the Linear(hidden, 1) of transformers' *ForSequenceClassification models


def fit_scalar_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Resize a scalar-head model's embeddings to the tokenizer and give it the pad id; True if the vocab grew.

    The score is read at the last token that is not padding (transformers finds it from `config.pad_token_id`), so
    the pad id must be the tokenizer's, distinct from EOS (see pipeline/tokenizer.py).
    """
    grew = len(tokenizer) > model.get_input_embeddings().num_embeddings
    if grew:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return grew


def build_scalar_model(
    base: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    finetune: str = "lora",
    lora: LoraArgs | None = None,
    gradient_checkpointing: bool = False,
    what: str = "reward.base",
) -> PreTrainedModel | peft.PeftModel:
    """A one-output sequence-classification model on a causal-LM base: the reward model, or PPO's value model.

    The score head is new (seed the RNG first); the score of a sequence is read at its last non-pad token. With
    finetune="lora" or "qlora" (4-bit NF4 base) the head is trained in full and saved with the adapter
    (`modules_to_save`); with "full" every weight trains. `gradient_checkpointing` prepares a 4-bit base for it; the
    Trainer's `activation_checkpointing` switches it on.
    """
    model = load_base_model(
        base, AutoModelForSequenceClassification, quantize_4bit=finetune == "qlora", what=what, num_labels=1
    )
    grew = fit_scalar_model(model, tokenizer)
    if finetune == "full":
        return model
    lora = lora or LoraArgs()
    if SCORE_HEAD not in lora.modules_to_save:
        lora = replace(lora, modules_to_save=[*lora.modules_to_save, SCORE_HEAD])
    return apply_lora(
        model,
        lora,
        task_type="SEQ_CLS",
        train_embeddings=grew,
        gradient_checkpointing=gradient_checkpointing,
        key=f"{what.split('.')[0]}.lora",
    )


def fit_pad_token(tokenizer: PreTrainedTokenizerBase, ends: list[int], what: str) -> None:
    """A model brought as it is (no SFT stage to prepare its tokenizer) may have no pad (Llama 3, GPT-2) or pad with
    an end id (Qwen's `<|endoftext|>`): use an unused special token it already has, as SFT does (`pad_candidate`;
    no new token, so the embeddings stay as they are), or refuse in one line when none fits."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return
    why = "has no pad token" if tokenizer.pad_token_id is None else f"pads with {tokenizer.pad_token!r}, an end id"
    candidate = pad_candidate(tokenizer, ends)
    if candidate is None:
        raise UserError(
            f"{what}: the tokenizer {why} and has no unused special token to pad with; save it with a distinct "
            "pad_token that is no end id (tokenizer.pad_token = ...; tokenizer.save_pretrained)"
        )
    tokenizer.pad_token = candidate
    logger.info("%s: the tokenizer %s; padding with its unused special token %r", what, why, candidate)


def check_reward_checkpoint(path: Path, what: str = "reward model") -> None:
    """Refuse in one line what would load as a reward model with a fresh, random score head: a causal LM (no
    *ForSequenceClassification architecture), an adapter without a score head (task_type CAUSAL_LM), or a head with
    more than one output (num_labels=2: a classifier, not one score per response)."""
    fix = (
        "give a sequence-classification model or adapter with one output (num_labels=1), e.g. the reward stage's "
        "final/"
    )
    if (path / "adapter_config.json").is_file():
        file = path / "adapter_model.safetensors"
        if file.is_file():
            from safetensors import safe_open

            with safe_open(str(file), "pt") as fh:
                shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
        elif (path / "adapter_model.bin").is_file():
            shapes = {k: list(v.shape) for k, v in torch.load(path / "adapter_model.bin", map_location="cpu").items()}
        else:
            raise UserError(f"{what} {path} has adapter_config.json but no adapter weights; {fix}")
        heads = [
            shape
            for k, shape in shapes.items()
            if k.split(".")[-2:] in (["score", "weight"], ["classifier", "weight"])
        ]
        if not heads:
            task = json.loads((path / "adapter_config.json").read_text()).get("task_type")
            raise UserError(f"{what} {path} is a LoRA adapter without a score head (task_type {task}); {fix}")
        if heads[0][0] != 1:
            raise UserError(f"{what} {path} has a score head with {heads[0][0]} outputs; {fix}")
        return
    check_model_source(path, what)
    config = AutoConfig.from_pretrained(str(path))
    architectures = config.architectures or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{what} {path} is a {architectures[0]}, not a reward model: its score head would start random; {fix}"
        )
    if architectures and config.num_labels != 1:
        raise UserError(f"{what} {path} has num_labels={config.num_labels} (one score per response needs 1); {fix}")


def load_reward_model(
    path: str | Path, base: str | Path | None = None, quantize_4bit: bool = False, what: str = "reward model"
) -> tuple[PreTrainedModel | peft.PeftModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a finished reward stage (`reward/final/`), or any one-output sequence-classification
    model or adapter (`check_reward_checkpoint`), in eval mode.

    An adapter is put on `base`, by default the base recorded in the stage's `stage.json` (the merged SFT model);
    a fully fine-tuned reward model loads as it is. `what` names it in errors (e.g. "ppo.reward_model").
    """
    path = Path(path)
    check_reward_checkpoint(path, what)
    tokenizer = load_tokenizer(path)
    fit_pad_token(tokenizer, end_ids(tokenizer), f"{what} {path}")
    if (path / "adapter_config.json").is_file():
        if base is None:
            stage = json.loads((path / "stage.json").read_text()) if (path / "stage.json").is_file() else {}
            base = stage.get("inputs", {}).get("base", {}).get("path")
            base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        model = load_base_model(
            base,
            AutoModelForSequenceClassification,
            quantize_4bit=quantize_4bit,
            what="reward model base",
            num_labels=1,
        )
        fit_scalar_model(model, tokenizer)
        model = peft.PeftModel.from_pretrained(model, str(path), is_trainable=False)
    else:
        model = load_base_model(
            path, AutoModelForSequenceClassification, quantize_4bit=quantize_4bit, what="reward model", num_labels=1
        )
        fit_scalar_model(model, tokenizer)
    model.eval()
    return model, tokenizer


def cut_start(ids: Sequence[int], keep: int, bos_id: int | None = None) -> list[int]:
    """The last `keep` of `ids`; a leading BOS stays first (the model has only ever read text after it, and Llama 3's
    or Gemma's outputs fall apart without it). cut_start([1, 2, 3, 4, 5], 3, bos_id=1) is [1, 4, 5]."""
    if len(ids) <= keep:
        return list(ids)
    if bos_id is not None and keep > 1 and ids[0] == bos_id:
        return [ids[0], *ids[len(ids) - keep + 1 :]]
    return list(ids[len(ids) - keep :])


def join_prompt_response(
    prompt_ids: list[int], response_ids: list[int], max_seq_len: int, bos_id: int | None = None
) -> list[int]:
    """Prompt then response token ids, cut to `max_seq_len`.

    The prompt loses its start first (down to half the budget; a leading `bos_id` is kept, see `cut_start`), then
    the response its end; the response's last token (EOS, where the reward is read) is always kept. With
    max_seq_len=6, prompt [1, 2, 3, 4, 5] and response [6, 7, 8, 9] (9 = EOS) give [3, 4, 5, 6, 7, 9], and
    [1, 4, 5, 6, 7, 9] with bos_id=1.
    """
    if len(prompt_ids) + len(response_ids) <= max_seq_len:
        return list(prompt_ids) + list(response_ids)
    keep_prompt = min(len(prompt_ids), max(max_seq_len // 2, max_seq_len - len(response_ids)))
    keep_response = max_seq_len - keep_prompt
    head = list(response_ids[: keep_response - 1]) + [response_ids[-1]]
    return cut_start(prompt_ids, keep_prompt, bos_id) + head


def encode_reward_input(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]] | str, response: str, max_seq_len: int
) -> list[int]:
    """Token ids a reward or value model scores: the prompt as generation renders it, the response, then the token
    that ends an assistant turn in the chat template (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; else EOS).

    The same ids PPO gets from `generate` (prompt ids + sampled ids up to EOS), so the reward model is trained on
    what it will score.
    """
    return encode_reward_inputs(tokenizer, prompt, [response], max_seq_len)[0]


def encode_reward_inputs(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]] | str, responses: list[str], max_seq_len: int
) -> list[list[int]]:
    """`encode_reward_input` for several responses to one prompt.

    A chat prompt and each response are rendered together by the chat template, so the ids are those of the
    template's assistant turn (Mistral's leading space, Qwen3's think block on a last turn), through the token that
    ends it (`pipeline.tokenizer.render_with_masks`). A plain-text prompt, or a turn whose span the template does not
    give, is joined as prompt ids + response ids + the template's end-of-turn token (EOS when it names none).
    """
    prompt_ids = tokenize_prompts(tokenizer, [prompt])[0]
    eos = [turn_end_id(tokenizer)]
    responses_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = []
    for response, ids in zip(responses, responses_ids, strict=True):
        rendered = _rendered_turn(tokenizer, prompt, response) if isinstance(prompt, list) else None
        head, tail = rendered if rendered is not None else (prompt_ids, ids + eos)
        out.append(join_prompt_response(head, tail, max_seq_len, tokenizer.bos_token_id))
    return out


def turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that ends an assistant turn in the chat template (EOS when the template says nothing)."""
    turn = turn_end_token(tokenizer)
    return tokenizer.convert_tokens_to_ids(turn) if turn is not None else tokenizer.eos_token_id


def _rendered_turn(tokenizer: PreTrainedTokenizerBase, prompt: list, response: str) -> tuple[list, list] | None:
    """(ids before the last assistant turn, ids of that turn through its end token), or None."""
    try:
        ids, mask = render_with_masks(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    except BadRecord:
        return None
    last = max((i for i, m in enumerate(mask) if m), default=None)
    if last is None:
        return None
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start : last + 1]


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of sequences padded on the right to the longest one."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    precision: Callable[[], contextlib.AbstractContextManager] | None = None,
    states_out: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The scalar output for each token sequence (float32, on the CPU), in batches of similar lengths; under
    `precision()` when given (PPO's one autocast), else `mixed_precision(model)`. With `states_out` (a list as long
    as `sequences`), each sequence's final states [len, hidden] as the score head read them, float32 on the CPU."""
    if not sequences:
        return torch.zeros(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.zeros(len(sequences))
    read: list[torch.Tensor] = []
    hook = None
    if states_out is not None:  # the head runs on every position before the model pools the last one
        hook = getattr(model, SCORE_HEAD).register_forward_hook(lambda _m, args, _out: read.append(args[0]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = right_pad([sequences[i] for i in chunk], pad_id)
            with precision() if precision is not None else mixed_precision(model):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            scores[chunk] = out.logits.squeeze(-1).float().cpu()
            if states_out is not None:
                states = read.pop().detach().float().cpu()
                for row, i in enumerate(chunk):
                    states_out[i] = states[row, : len(sequences[i])]
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    return scores


def reward_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]] | str],
    responses: list[str],
    max_seq_len: int = 256,
    batch_size: int = 32,
    precision: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Rewards of (prompt, response) texts, one float per pair."""
    sequences = [encode_reward_input(tokenizer, p, r, max_seq_len) for p, r in zip(prompts, responses, strict=True)]
    return score_sequences(model, sequences, tokenizer.pad_token_id, batch_size, precision)
