"""The four roles of PPO on one copy of the base weights.

    base  = the SFT model merged (sft/final/merged), frozen, loaded once (optionally 4-bit NF4: QLoRA)
    policy     = base + LoRA adapter "policy" (fresh: B = 0, so the policy starts as the SFT model)
    reference  = base with every adapter disabled (the KL is to the SFT model, not to the pretrained one)
    value      = base + LoRA adapter "value" + a scalar head, both copied from the reward model
    reward     = base + LoRA adapter "reward" + its score head (the reward stage's output), frozen

A role is picked per forward pass by switching the active adapter (`use_adapter`), so all four share the base's
weights and its forward code. Optionally the reward model (`reward_placement=separate`, any architecture and
tokenizer: it is fed re-tokenised text) or the critic (`critic_placement=separate`) get their own copy. Other
critics are a head without a model of their own: on the policy's final states (`critic=trunk`, `head`), or on the
frozen reward model's, as its scoring pass computes them (`critic=reward`).

The reward model scores the conversation rendered as text with its tokenizer's chat template, the way the reward
stage saw its training data (or with `reward_input=ids` the policy's own ids), and reads its score at the last token.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from pipeline.config import PPOConfig
from pipeline.errors import UserError
from pipeline.generation import Prompt, entropy_from_logits, logprobs_from_logits
from pipeline.modeling import (
    SCORE_HEAD,
    WEIGHT_FILES,
    build_lora_config,
    check_lora_modules,
    check_model_source,
    encode_reward_input,
    fit_pad_token,
    lm_logits,
    load_base_model,
    load_reward_model,
    right_pad,
    score_sequences,
)
from pipeline.ppo.lean_lora import use_lean_lora
from pipeline.ppo.numerics import Numerics, build_numerics
from pipeline.tokenizer import end_ids, load_tokenizer

logger = logging.getLogger(__name__)

POLICY, VALUE, REWARD = "policy", "value", "reward"
FULL_PRECISION = Numerics("cpu", None)
HEAD_MODULES = ("score", "classifier")  # where peft's SEQ_CLS task keeps the scalar head


# --------------------------------------------------------------------------------------------------------------
# Checks that fail loudly at start


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """PPO needs an EOS token to end responses and a pad token that is no end id (else ended responses look cut)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{what}: the tokenizer has no EOS token, so responses never end; give it one (eos_token)")
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"{what}: the tokenizer has no pad token; add a distinct one (pipeline.tokenizer.prepare_chat_tokenizer)"
        )
    if tokenizer.pad_token_id in end_ids(tokenizer):
        raise UserError(
            f"{what}: the pad token {tokenizer.pad_token!r} is an end id, so masking padding would also hide "
            "every real EOS and finished responses would look cut off; give the tokenizer a distinct pad token"
        )


def _weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            with (path / name).open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def same_base(a: str | Path, b: str | Path) -> bool:
    """True when two model references name the same weights (same resolved path, or identical weight files)."""
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return False
    if pa.resolve() == pb.resolve():
        return True
    return _weights_digest(pa) == _weights_digest(pb)


# --------------------------------------------------------------------------------------------------------------
# Scalar-head adapters (the reward stage's output, and the value model we save)


@dataclass
class ScalarAdapter:
    """A SEQ_CLS LoRA adapter on disk, split into its LoRA weights and its scalar head."""

    path: Path
    config: dict[str, Any]
    lora: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # "weight" [1, hidden] and maybe "bias" [1]
    base: str | None  # the base it was trained on


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_scalar_adapter(path: str | Path, what: str) -> ScalarAdapter:
    """Read a reward or value adapter: LoRA weights, score head, and the base it was trained on."""
    path = Path(path)
    if not is_adapter(path):
        if (path / "config.json").is_file():  # a full model: it scores on its own weights
            raise UserError(
                f"{what} {path} is a full model, not a LoRA adapter on the policy's base: set "
                "ppo.reward_placement=separate to score with its own weights (or give the reward stage's final/)"
            )
        raise UserError(
            f"{what} {path} is not a PEFT adapter (no adapter_config.json); give the reward stage's final/"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{what} {path} is a {config.get('peft_type')} adapter; PPO shares a base only with LoRA ones")
    file = path / "adapter_model.safetensors"
    state = load_file(str(file)) if file.is_file() else torch.load(path / "adapter_model.bin", map_location="cpu")
    head, lora, extra = {}, {}, []
    for key, value in state.items():
        parts = key.split(".")
        if "lora_" in key:
            lora[key] = value
        elif len(parts) >= 2 and parts[-2] in HEAD_MODULES:
            head[parts[-1]] = value
        else:
            extra.append(key)
    if "weight" not in head or head["weight"].shape[0] != 1:
        raise UserError(f"{what} {path} has no scalar head (a 'score' layer with one output) saved in the adapter")
    if extra:
        raise UserError(
            f"{what} {path} also trains {extra[0]} (and {len(extra) - 1} more) in full, so it does not run on the "
            "shared base; use ppo.reward_placement=separate"
        )
    return ScalarAdapter(path, config, lora, head, adapter_base(path))


def adapter_base(path: Path) -> str | None:
    """The base an adapter was trained on: its stage.json's input (when a stage made it), else adapter_config.json."""
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    stage = path / "stage.json"
    if stage.is_file():
        base = json.loads(stage.read_text()).get("inputs", {}).get("base", {}).get("path", base)
    return base


def lora_config_of(adapter: ScalarAdapter) -> peft.LoraConfig:
    """The adapter's LoRA settings as a causal-LM adapter (its head lives outside peft here)."""
    fields = {k: v for k, v in adapter.config.items() if k in peft.LoraConfig.__dataclass_fields__}
    fields.update(task_type="CAUSAL_LM", modules_to_save=None, inference_mode=False, base_model_name_or_path=None)
    return peft.LoraConfig(**fields)


def save_adapter(model: peft.PeftModel, name: str, out: Path, base: str, head: torch.nn.Linear | None = None) -> None:
    """Save adapter `name` so `PeftModel.from_pretrained(base, out)` loads it; with `head`, as a SEQ_CLS adapter
    whose score head is `head` (loadable like the reward model, with AutoModelForSequenceClassification)."""
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode, config.base_model_name_or_path = True, str(base)
    state = {
        k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model, adapter_name=name).items()
    }
    if head is not None:
        config.task_type, config.modules_to_save = "SEQ_CLS", ["score"]
        for key, value in head.state_dict().items():
            state[f"base_model.model.score.{key}"] = value.detach().cpu().contiguous()
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter_weights(model: peft.PeftModel, name: str, lora: dict[str, torch.Tensor]) -> None:
    """Put saved LoRA weights into adapter `name` (every weight must land: a mismatch is an error, not a warning)."""
    result = peft.set_peft_model_state_dict(model, lora, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
    if result.unexpected_keys or missing:
        raise UserError(
            f"adapter weights do not fit the base: {len(result.unexpected_keys)} unexpected, {len(missing)} missing "
            f"(e.g. {(result.unexpected_keys or missing)[0]}); was the adapter trained on another base?"
        )


def scalar_head(
    hidden_size: int, state: dict[str, torch.Tensor] | None, device: torch.device, bias: bool | None = None
) -> torch.nn.Linear:
    """A [hidden] -> 1 linear head, from saved weights or zero (a fresh critic predicts 0 everywhere); with a bias
    when `bias` says so (default: when `state` has one; a bias missing from `state` starts at 0)."""
    bias = state is not None and "bias" in state if bias is None else bias
    head = torch.nn.Linear(hidden_size, 1, bias=bias)
    with torch.no_grad():
        if state is None:
            head.weight.zero_()
        else:
            if state["weight"].shape[1] != hidden_size:
                raise UserError(
                    f"the score head expects hidden size {state['weight'].shape[1]}, the base has {hidden_size}"
                )
            head.weight.copy_(state["weight"].float())
            if bias:
                head.bias.copy_(state["bias"].float() if "bias" in state else torch.zeros(1))
    return head.to(device)


def normalised_head_state(head: dict[str, torch.Tensor], mean: float, std: float) -> dict[str, torch.Tensor]:
    """A score head that outputs (score - mean) / std, the scale of PPO's returns: weight / std, and a bias
    (bias - mean) / std. The value head starts there, so its first errors are those of the reward model, not a
    constant offset that GAE would put on each response's last token."""
    bias = head["bias"].float() if "bias" in head else torch.zeros(1)
    return {"weight": head["weight"].float() / std, "bias": (bias - mean) / std}


# --------------------------------------------------------------------------------------------------------------
# Forward passes of the roles


def _tuner_state(model: peft.PeftModel) -> dict[str, Any]:
    """The model's LoRA layers and adapter parameters, found once (switching roles then costs one pass over them)."""
    state = model.__dict__.get("_ppo_roles")
    if state is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        params = [(p, f".{POLICY}." in n or f".{VALUE}." in n) for n, p in model.named_parameters() if "lora_" in n]
        state = model.__dict__["_ppo_roles"] = {"layers": layers, "params": params, "active": None}
    return state


def _keep_trainable(model: peft.PeftModel) -> None:
    # peft's layer-level set_adapter / enable_adapters make only the active adapter trainable; put back the plan:
    # the policy and value adapters train, the reward adapter never does.
    for param, trainable in _tuner_state(model)["params"]:
        param.requires_grad_(trainable)


def activate_adapter(model: peft.PeftModel, name: str) -> None:
    """Make adapter `name` the active one (it stays active until another is activated)."""
    state = _tuner_state(model)
    if state["active"] != name:
        for layer in state["layers"]:
            layer.set_adapter(name)
        model.base_model.active_adapter = name  # what PeftModel.active_adapter reports
        state["active"] = name
        _keep_trainable(model)


@contextlib.contextmanager
def use_adapter(model: peft.PeftModel, name: str | None) -> Iterator[None]:
    """Run `model` as one role: adapter `name` active, or every adapter disabled (None: the reference).

    Done layer by layer on the cached LoRA layers; peft's `disable_adapter()` context does the same but first
    inspects every module of the model, which costs more than a small model's forward pass.
    """
    if name is not None:
        activate_adapter(model, name)
        yield
        return
    layers = _tuner_state(model)["layers"]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        _keep_trainable(model)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as `model.generate` assigns them), so log-probs match sampling."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def hidden_states(model: peft.PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the base's transformer body (with whichever adapter is active): [batch, seq, hidden]."""
    lm = model.get_base_model()
    body = getattr(lm, lm.base_model_prefix)
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def response_logprobs(
    model: peft.PeftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens (positions >= prompt_len) under softmax(logits / temperature), and entropy.

    The LM head runs only on the states that predict response tokens (not on the prompt), which saves a large
    matmul per prompt token.
    """
    states = hidden_states(model, input_ids, attention_mask)[:, prompt_len - 1 : -1]
    logits = lm_logits(model.get_base_model(), states)  # with the family's soft-cap / logit scale, as generate
    tokens = input_ids[:, prompt_len:]
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, entropy


def response_values(
    model: peft.PeftModel,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    numerics: Numerics = FULL_PRECISION,
) -> torch.Tensor:
    """V(s_t) for each response token t: the value head on the state before the token, [batch, response_len].
    The body runs under `numerics`' autocast, the head in float32."""
    with numerics():
        states = hidden_states(model, input_ids, attention_mask)[:, prompt_len - 1 : -1]
    with numerics.full_precision():
        return head(states.to(head.weight.dtype)).squeeze(-1)


class _RewardModel:
    """What both placements share: the ids a reward model reads, and its scores of them."""

    tokenizer: PreTrainedTokenizerBase
    max_len: int

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        """The ids the reward stage trained on (`pipeline.modeling.encode_reward_input`: the rendered prompt, the
        re-tokenised response text, the end of the turn), in the reward model's own tokenizer."""
        return [
            encode_reward_input(self.tokenizer, p, r, self.max_len) for p, r in zip(prompts, responses, strict=True)
        ]

    def score_ids(
        self, sequences: list[list[int]], batch_size: int, states_out: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int) -> torch.Tensor:
        """Raw reward-model scores of each (prompt, response), [batch] on the CPU."""
        return self.score_ids(self.encode(prompts, responses), batch_size)


class SharedReward(_RewardModel):
    """The reward adapter and score head on the shared base; it reads its score at the last token."""

    def __init__(
        self,
        model: peft.PeftModel,
        head: torch.nn.Linear,
        tokenizer: PreTrainedTokenizerBase,
        max_len: int,
        numerics: Numerics = FULL_PRECISION,
    ):
        self.model, self.head, self.tokenizer, self.max_len = model, head, tokenizer, max_len
        self.numerics = numerics

    @torch.no_grad()
    def score_ids(
        self, sequences: list[list[int]], batch_size: int, states_out: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """Scores of token sequences, [batch] on the CPU; with `states_out`, each one's final states [len, hidden]."""
        out = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = right_pad(sequences[start : start + batch_size], self.tokenizer.pad_token_id)
            ids, mask = ids.to(self.head.weight.device), mask.to(self.head.weight.device)
            with use_adapter(self.model, REWARD), self.numerics():
                states = hidden_states(self.model, ids, mask)
            lengths = mask.sum(1)
            if states_out is not None:
                for row, length in enumerate(lengths.tolist()):
                    states_out[start + row] = states[row, :length].float().cpu()
            pooled = states[torch.arange(len(ids), device=ids.device), lengths - 1]
            with self.numerics.full_precision():
                out.append(self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float().cpu())
        return torch.cat(out)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}


class SeparateReward(_RewardModel):
    """A reward model with its own weights and tokenizer (a SEQ_CLS adapter on its own base, or a full model),
    fed the conversation re-tokenised with its own tokenizer."""

    def __init__(
        self, path: str, quantize_4bit: bool, device: torch.device, max_len: int, numerics: Numerics = FULL_PRECISION
    ):
        self.numerics = numerics
        self.model, self.tokenizer = load_reward_model(path, quantize_4bit=quantize_4bit, what="ppo.reward_model")
        check_tokenizer(self.tokenizer, f"ppo.reward_model {path}")
        if not quantize_4bit:
            self.model.to(device)
        self.model.requires_grad_(False)
        self.max_len, self.path = max_len, path
        self.adapters_off = contextlib.nullcontext  # a value adapter put on these weights is off while they score

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        if not self.tokenizer.chat_template and not all(isinstance(p, str) for p in prompts):
            raise UserError(
                f"ppo.reward_model {self.path}: its tokenizer has no chat template, so it cannot read chat prompts; "
                "save the template it was trained with (tokenizer.chat_template = ...; tokenizer.save_pretrained)"
            )
        return super().encode(prompts, responses)

    def score_ids(
        self, sequences: list[list[int]], batch_size: int, states_out: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        with self.adapters_off():
            pad = self.tokenizer.pad_token_id
            return score_sequences(self.model, sequences, pad, batch_size, self.numerics, states_out)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The trained score head (an adapter's own copy of it, not the base's untrained one)."""
        head = getattr(self.model, SCORE_HEAD)
        if hasattr(head, "modules_to_save"):  # peft's wrapper: the copy trained with the adapter
            head = head.modules_to_save[head.active_adapters[0]]
        return {k: v.detach().clone() for k, v in head.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Building the roles


@dataclass
class Roles:
    """Everything PPO runs: `model` holds the policy (and usually the value and reward adapters) on one base."""

    model: peft.PeftModel
    tokenizer: PreTrainedTokenizerBase
    critic: peft.PeftModel | None  # `model` itself unless critic_placement=separate; None without a critic (rloo/grpo)
    value_head: torch.nn.Linear | None
    reward: SharedReward | SeparateReward
    base_path: str
    reward_stats: dict[str, float] | None
    end_ids: list[int]  # every id that ends a response (EOS, the template's end of turn, generation_config's)
    numerics: Numerics = FULL_PRECISION  # the autocast of every pass (pipeline/ppo/numerics.py)
    trunk_critic: bool = False  # the value head reads the policy's own states (ppo.critic=trunk or head)
    reward_critic: bool = (
        False  # ppo.critic=reward: the value head reads the reward model's states, kept by the rollout
    )
    critic_base: str | None = None  # the value adapter's base when it is not base_path (a separate reward model)
    detached_states: bool = False  # ppo.critic=head: the value loss reaches the head only, not the policy adapter

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        """The policy adapter's weights, in a fixed order."""
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n and "lora_" in n]

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """The value adapter's weights and the value head, in a fixed order (none without a critic)."""
        if self.value_head is None:
            return []
        if self.critic is None or self.trunk_critic:  # a head on states the critic does not train: only the head
            return list(self.value_head.parameters())
        params = [p for n, p in self.critic.named_parameters() if f".{VALUE}." in n and "lora_" in n]
        return params + list(self.value_head.parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Policy, then critic parameters (the optimiser's two groups and the checkpoint's order)."""
        return self.policy_parameters() + self.critic_parameters()

    def frozen_base_parameters(self) -> dict[str, torch.Tensor]:
        """The shared base's own weights (never trained), by name."""
        return {n: p for n, p in self.model.named_parameters() if "lora_" not in n}

    def policy_logprobs(self, input_ids, attention_mask, prompt_len, temperature, with_entropy=False):
        with use_adapter(self.model, POLICY), self.numerics():
            return response_logprobs(self.model, input_ids, attention_mask, prompt_len, temperature, with_entropy)

    def reference_logprobs(self, input_ids, attention_mask, prompt_len, temperature):
        with use_adapter(self.model, None), self.numerics():
            return response_logprobs(self.model, input_ids, attention_mask, prompt_len, temperature)[0]

    def policy_logprobs_and_values(self, input_ids, attention_mask, prompt_len, temperature, with_entropy=False):
        """(log-probs, entropy or None, values) of the response tokens from one forward of the policy: the trunk
        critic's head reads the same states as the LM head."""
        with use_adapter(self.model, POLICY), self.numerics():
            states = hidden_states(self.model, input_ids, attention_mask)[:, prompt_len - 1 : -1]
            logits = lm_logits(self.model.get_base_model(), states)
            tokens = input_ids[:, prompt_len:]
            logprobs = logprobs_from_logits(logits, tokens, temperature)
            entropy = entropy_from_logits(logits, temperature) if with_entropy else None
        return logprobs, entropy, self.head_values(states)

    def head_values(self, states: torch.Tensor) -> torch.Tensor:
        """The value head on final hidden states [..., hidden], in float32."""
        if self.detached_states:
            states = states.detach()
        with self.numerics.full_precision():
            return self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1)

    def values(self, input_ids, attention_mask, prompt_len):
        if self.trunk_critic:
            return self.policy_logprobs_and_values(input_ids, attention_mask, prompt_len, 1.0)[2]
        with use_adapter(self.critic, VALUE):
            return response_values(self.critic, self.value_head, input_ids, attention_mask, prompt_len, self.numerics)

    def generation_model(self) -> peft.PeftModel:
        """The model to sample from, with the policy adapter active."""
        activate_adapter(self.model, POLICY)
        return self.model


TRUNK_HEAD = "value_head.safetensors"  # critic=trunk, head or reward: the head alone (the states are not its own)


def save_critic(roles: Roles, out: Path) -> None:
    """The critic into `out`: the value adapter and head (loadable like the reward model), or with critic=trunk, head
    or reward the head alone (`value_head.safetensors`); nothing without a critic."""
    if roles.value_head is None:
        return
    if roles.critic is not None and not roles.trunk_critic:
        save_adapter(roles.critic, VALUE, out, roles.critic_base or roles.base_path, head=roles.value_head)
        return
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in roles.value_head.state_dict().items()}
    reads = "the reward model's final states" if roles.reward_critic else "the policy adapter's final states"
    save_file(state, str(out / TRUNK_HEAD), metadata={"critic": f"a value head on {reads}"})


def load_critic(roles: Roles, path: Path) -> None:
    """Put a critic saved by `save_critic` in place."""
    if roles.value_head is None:
        return
    if roles.critic is None or roles.trunk_critic:
        state = load_file(str(path / TRUNK_HEAD))
    else:
        value = load_file(str(path / "adapter_model.safetensors"))
        load_adapter_weights(roles.critic, VALUE, {k: v for k, v in value.items() if "lora_" in k})
        state = {k.rsplit(".", 1)[-1]: v for k, v in value.items() if k.startswith("base_model.model.score.")}
    with torch.no_grad():
        for key, param in roles.value_head.named_parameters():
            param.copy_(state[key])


def _load_base(base_path: str, quantize_4bit: bool, device: torch.device) -> Any:
    """The frozen base, in eval mode (dropout off in every role; nothing here ever calls .train())."""
    base = load_base_model(base_path, quantize_4bit=quantize_4bit, what="ppo.policy_base")
    if quantize_4bit:  # bitsandbytes placed the weights at load time
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base.to(device)
    return base.requires_grad_(False).eval()


def _shared_reward_adapter(pcfg: PPOConfig, base_path: str, reward_path: str) -> ScalarAdapter | None:
    """The reward adapter to put on the policy's base; refused when it was trained on another base."""
    if pcfg.reward_placement != "shared":
        return None
    adapter = read_scalar_adapter(reward_path, "ppo.reward_model")
    if adapter.base is None or not same_base(adapter.base, base_path):
        raise UserError(
            f"the reward model {reward_path} was trained on {adapter.base}, not on the policy base {base_path}; "
            "train it on that base, or set ppo.reward_placement=separate (its own weights in memory)"
        )
    return adapter


def _add_critic(
    pcfg: PPOConfig, model: peft.PeftModel, base_path: str, reward: ScalarAdapter | None, device: torch.device
) -> tuple[peft.PeftModel, torch.nn.Linear]:
    """The value adapter (on the shared base, or on its own copy) and head; copies of the reward model's or fresh."""
    base = model.get_base_model()
    config = lora_config_of(reward) if pcfg.value_init == "reward" else build_lora_config(pcfg.lora, base, "CAUSAL_LM")
    if pcfg.critic_placement == "separate":
        critic = peft.get_peft_model(
            _load_base(base_path, pcfg.finetune == "qlora", device), config, adapter_name=VALUE
        )
    else:
        critic = model
        model.add_adapter(VALUE, config)
    if pcfg.value_init == "reward":
        load_adapter_weights(critic, VALUE, reward.lora)
    hidden = base.config.get_text_config().hidden_size
    head = reward.head if pcfg.value_init == "reward" else None
    return critic, _value_head(pcfg, hidden, head, str(reward.path) if reward else None, device)


def _value_head(
    pcfg: PPOConfig, hidden: int, reward_head: dict[str, torch.Tensor] | None, reward_path: str | None, device
) -> torch.nn.Linear:
    """The critic's head: a copy of the reward model's score head, or zero when there is none (value_init=fresh);
    with reward_normalization=reward_stats the critic predicts returns built from normalised scores, so it starts
    on their scale."""
    stats = read_reward_stats(reward_path) if reward_head and pcfg.reward_normalization == "reward_stats" else None
    if stats is not None:
        reward_head = normalised_head_state(reward_head, stats["mean"], stats["std"])
    return scalar_head(hidden, reward_head, device, bias=True)


def _check_same_vocab(reward: _RewardModel, tokenizer: PreTrainedTokenizerBase, what: str, fix: str) -> None:
    if reward.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{what} on the policy's token ids, but its tokenizer is not the policy's: set {fix}")


def _reward_critic_head(
    pcfg: PPOConfig,
    reward: SharedReward | SeparateReward,
    reward_path: str,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> torch.nn.Linear:
    """critic=reward: a value head on the reward model's own final states, which it reads on the policy's tokens."""
    _check_same_vocab(
        reward, tokenizer, f"ppo.critic=reward reads the reward model {reward_path}", "ppo.critic=adapter"
    )
    head = reward.head_state()
    return _value_head(
        pcfg, head["weight"].shape[1], head if pcfg.value_init == "reward" else None, reward_path, device
    )


def _critic_from_separate_reward(
    pcfg: PPOConfig, reward: SeparateReward, path: str, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[peft.PeftModel, torch.nn.Linear]:
    """reward_placement=separate, value_init=reward: a value adapter on the reward model's weights (InstructGPT's
    value model starts as the reward model), its score head the value head on the scale of the returns. The critic
    reads the policy's token ids, so the reward model must have the policy's tokenizer.

    A full reward model lends its own weights: the value adapter sits on them and is switched off while they score,
    so the critic costs no second copy. An adapter reward model is merged into a copy (merging its own weights would
    change its scores by rounding, and a 4-bit base by requantising)."""
    if reward.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"ppo.value_init=reward with reward_placement=separate starts the value model from the reward model "
            f"{path}, whose tokenizer is not the policy's: set ppo.value_init=fresh"
        )
    if isinstance(reward.model, peft.PeftModel):  # a SEQ_CLS adapter on its own base: a merged copy
        scorer = load_reward_model(path, quantize_4bit=pcfg.finetune == "qlora", what="ppo.reward_model")[0]
        scorer = scorer.merge_and_unload()
        if pcfg.finetune != "qlora":
            scorer.to(device)
    else:
        scorer = reward.model
    head = {k: v.detach().clone() for k, v in getattr(scorer, SCORE_HEAD).state_dict().items()}
    config = build_lora_config(pcfg.lora, scorer)
    config.task_type = None  # the body alone: a plain PeftModel (its own head is the value head below)
    critic = peft.get_peft_model(scorer.requires_grad_(False).eval(), config, adapter_name=VALUE)
    if scorer is reward.model:
        reward.adapters_off = lambda: use_adapter(critic, None)
    return critic, _value_head(pcfg, scorer.config.get_text_config().hidden_size, head, path, device)


def build_roles(pcfg: PPOConfig, base_path: str, reward_path: str, device: torch.device) -> Roles:
    """Load the base once and put the policy, value and reward adapters on it (see the module docstring)."""
    numerics = build_numerics(pcfg.mixed_precision, device)
    check_model_source(base_path, "ppo.policy_base")  # a folder that is no model: named before its tokenizer is read
    tokenizer = load_tokenizer(base_path)
    if tokenizer.eos_token_id is not None:  # a model brought as it is: pad with an unused special token
        fit_pad_token(tokenizer, end_ids(tokenizer, _generation_config(base_path)), f"ppo.policy_base {base_path}")
    check_tokenizer(tokenizer, "ppo.policy_base")
    reward_adapter = _shared_reward_adapter(pcfg, base_path, reward_path)
    base = _load_base(base_path, pcfg.finetune == "qlora", device)
    vocab = base.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UserError(
            f"ppo.policy_base {base_path}: the tokenizer has {len(tokenizer)} tokens, the model only {vocab}"
        )
    check_lora_modules(base, pcfg.lora, "ppo.lora")
    model = peft.get_peft_model(base, build_lora_config(pcfg.lora, base, "CAUSAL_LM"), adapter_name=POLICY)
    critic, value_head, critic_base = None, None, None
    hidden = base.config.get_text_config().hidden_size
    reward_len = reward_max_len(pcfg, reward_path)
    if reward_adapter is None:
        reward: SharedReward | SeparateReward = SeparateReward(
            reward_path, pcfg.finetune == "qlora", device, reward_len, numerics
        )
    trunk = pcfg.advantage == "gae" and pcfg.critic in ("trunk", "head")
    if trunk:  # a fresh head on the policy's states (the reward head reads the reward adapter's, not these)
        critic, value_head = model, scalar_head(hidden, None, device, bias=True)
    elif pcfg.advantage == "gae" and pcfg.critic == "adapter" and pcfg.value_init == "reward" and not reward_adapter:
        critic, value_head = _critic_from_separate_reward(pcfg, reward, reward_path, tokenizer, device)
        critic_base = reward_path
    elif pcfg.advantage == "gae" and pcfg.critic == "adapter":  # rloo, grpo: the other responses are the baseline
        critic, value_head = _add_critic(pcfg, model, base_path, reward_adapter, device)
    if reward_adapter is not None:
        model.add_adapter(REWARD, lora_config_of(reward_adapter))
        load_adapter_weights(model, REWARD, reward_adapter.lora)
        head = scalar_head(hidden, reward_adapter.head, device).requires_grad_(False)
        reward = SharedReward(model, head, tokenizer, reward_len, numerics)
    if pcfg.reward_input == "ids":
        _check_same_vocab(
            reward, tokenizer, f"ppo.reward_input=ids feeds the reward model {reward_path}", "ppo.reward_input=text"
        )
    if pcfg.advantage == "gae" and pcfg.critic == "reward":  # no module of its own: the reward model's states
        value_head = _reward_critic_head(pcfg, reward, reward_path, tokenizer, device)
    for part in {id(m): m for m in (model, critic) if m is not None}.values():
        use_lean_lora(part)  # the same LoRA function with two fewer full-size tensor ops per layer
        _keep_trainable(part)
        part.eval()  # peft builds its wrappers in training mode
    activate_adapter(model, POLICY)
    ends = end_ids(tokenizer, base)
    if tokenizer.pad_token_id in ends:
        raise UserError(
            f"ppo.policy_base {base_path}: the pad token {tokenizer.pad_token!r} is one of its end ids {ends}"
        )
    logger.info("ppo: responses end at any of the ids %s; every pass computes in %s", ends, numerics.name)
    stats = read_reward_stats(reward_path)
    return Roles(
        model,
        tokenizer,
        critic,
        value_head,
        reward,
        base_path,
        stats,
        ends,
        numerics,
        trunk_critic=trunk,
        reward_critic=pcfg.advantage == "gae" and pcfg.critic == "reward",
        critic_base=critic_base,
        detached_states=trunk and pcfg.critic == "head",
    )


def _generation_config(path: str) -> Any:
    """The model's generation_config (its end ids), or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def reward_max_len(pcfg: PPOConfig, reward_path: str) -> int:
    """Longest sequence the reward model scores: what the reward stage trained with (its reward.max_seq_len), else
    room for the longest prompt, response and EOS (a response re-tokenised from text may come out a little longer)."""
    stage = Path(reward_path) / "stage.json"
    if stage.is_file():
        trained = json.loads(stage.read_text()).get("settings", {}).get("reward.max_seq_len")
        if isinstance(trained, int) and trained > 0:
            return trained
    return pcfg.max_prompt_len + 2 * pcfg.max_new_tokens + 1


def read_reward_stats(reward_path: str) -> dict[str, float] | None:
    """The reward stage's {"mean", "std"} of scores on SFT-policy responses, if it saved them."""
    path = Path(reward_path) / "reward_stats.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    if not ({"mean", "std"} <= set(stats)) or not stats["std"] > 0:
        raise UserError(f"{path} must hold {{'mean', 'std'}} with std > 0, got {stats}")
    return {"mean": float(stats["mean"]), "std": float(stats["std"])}
