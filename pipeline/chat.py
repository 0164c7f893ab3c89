"""`rlhf chat RUN_DIR/<stage>`: talk to a stage's model in the terminal, tokens streamed as they are sampled.

Works for every stage that ends in a language model: pretrain (plain weights), sft (its merged weights), ppo (the
policy adapter on the base its stage.json names), and reward (a reward model scores rather than talks, so the chat
is with the causal LM it was built on). The conversation keeps its history (oldest turns are dropped when the context
is full); `/reset` clears it, `/set temperature=0.7` changes sampling, `/exit` or Ctrl-D quits.

    rlhf chat runs/demo/sft
    rlhf chat runs/demo/ppo --prompt "What is the capital of Veloria?" --greedy
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import peft
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from pipeline.checkpoints import check_final_files, is_finished, read_stage_json
from pipeline.data.records import BadRecord
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs, special_ids
from pipeline.modeling import WEIGHT_FILES, check_model_source
from pipeline.tokenizer import load_tokenizer, render_chat

logger = logging.getLogger(__name__)

BASE_ROLES = ("policy_base", "base")  # stage.json input roles that name the causal LM an adapter sits on
HELP = "commands: /reset (forget the conversation), /set key=value (temperature, top_p, top_k, max_new_tokens), /exit"


def resolve_final(path: str | Path) -> Path:
    """`RUN_DIR/<stage>` or `RUN_DIR/<stage>/final` -> the finished final/ directory."""
    path = Path(path)
    for candidate in (path / "final", path):
        if is_finished(candidate):
            return candidate
    raise UserError(f"{path} is not a finished stage (no final/stage.json); give e.g. runs/demo/sft after it finished")


def load_chat_model(path: str | Path) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) of the language model a finished stage produced."""
    final = resolve_final(path)
    record = read_stage_json(final)
    check_final_files(final)
    for candidate in (final, final / "merged"):
        if any((candidate / name).is_file() for name in WEIGHT_FILES) and (candidate / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(candidate)
            return model, load_tokenizer(candidate), f"{record['stage']} model {candidate}"
    adapter_file = final / "adapter_config.json"
    if not adapter_file.is_file():
        raise UserError(f"{final} holds neither model weights nor an adapter; nothing to chat with")
    if not any((final / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(
            f"{final} has adapter_config.json but no adapter_model.safetensors; restore it, or run the stage again "
            "with --rerun"
        )
    inputs = record.get("inputs", {})
    role = next((r for r in BASE_ROLES if r in inputs), None)
    if role is None:
        raise UserError(f"{final}/stage.json names no base model (inputs {sorted(inputs)}); cannot load the adapter")
    base = check_model_source(inputs[role]["path"], what=f"the base of {final}")
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = load_tokenizer(final if (final / "tokenizer_config.json").is_file() else base)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    task = json.loads(adapter_file.read_text()).get("task_type")
    if task != "CAUSAL_LM":
        logger.warning(
            "%s is a %s adapter (a reward model scores, it does not talk): chatting with its base %s",
            final,
            task,
            base,
        )
        return model, tokenizer, f"base of the {record['stage']} stage, {base}"
    model = peft.PeftModel.from_pretrained(model, str(final))
    return model, tokenizer, f"{record['stage']} adapter {final} on {base}"


def render(tokenizer: Any, messages: list[dict]) -> str:
    """The conversation rendered by the chat template with the generation prompt; a template that refuses it (Gemma
    2 has no system role) is a one-line `UserError` with the template's reason."""
    try:
        return render_chat(tokenizer, messages)
    except BadRecord as bad:
        system = " (leave out --system)" if any(m["role"] == "system" for m in messages) else ""
        raise UserError(f"the model's chat template cannot render this conversation: {bad.detail}{system}") from None


def fit_history(tokenizer: Any, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest exchanges (never a system message or the last turn) until the prompt fits `budget` tokens."""
    messages = list(messages)
    while len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]) > budget:
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first is None or first >= len(messages) - 1:
            break
        del messages[first]
        while first < len(messages) - 1 and messages[first]["role"] == "assistant":
            del messages[first]
    return messages


def stream_reply(model: Any, tokenizer: Any, messages: list[dict], sampling: Any, out: TextIO) -> str:
    """Sample a reply to `messages`, writing its text to `out` as it is generated; return the whole reply."""
    eos_id, pad_id = special_ids(tokenizer, model)  # stops at any end id of the family
    text = render(tokenizer, messages)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        streamer=streamer,
    )
    if sampling.do_sample:
        settings.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    device = next(model.parameters()).device
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(**{k: v.to(device) for k, v in inputs.items()}, **settings)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    thread.join()
    out.write("\n")
    if errors:
        raise errors[0]
    return "".join(pieces).strip()


def apply_setting(sampling: Any, command: str) -> Any:
    """`/set key=value` -> a new SamplingArgs (invalid values raise UserError)."""
    import dataclasses

    key, _, value = command.partition("=")
    key = key.strip()
    fields = {f.name: f.type for f in dataclasses.fields(sampling)}
    if key not in fields or not value.strip():
        raise UserError(f"/set {command}: use key=value with key one of {', '.join(fields)}")
    kind = {"max_new_tokens": int, "top_k": int, "temperature": float, "top_p": float}.get(key)
    try:
        parsed = (value.strip().lower() in ("1", "true", "yes")) if kind is None else kind(value)
    except ValueError:
        raise UserError(f"/set {key}: {value!r} is not a number") from None
    return dataclasses.replace(sampling, **{key: parsed})


def chat_loop(model: Any, tokenizer: Any, sampling: Any, system: str | None, read: Any, out: TextIO) -> None:
    """The interactive loop: `read(prompt)` returns the user's line (raises EOFError at the end)."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    budget = _context_budget(model, sampling)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/set"):
            try:
                sampling = apply_setting(sampling, line[len("/set") :].strip())
                out.write(f"({sampling})\n")
            except UserError as exc:
                out.write(f"({exc})\n")
            continue
        if line.startswith("/"):
            out.write(f"({HELP})\n")
            continue
        history = fit_history(tokenizer, history + [{"role": "user", "content": line}], budget)
        out.write("model> ")
        reply = stream_reply(model, tokenizer, history, sampling, out)
        history.append({"role": "assistant", "content": reply})


def _context_budget(model: Any, sampling: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return max(8, int(limit) - sampling.max_new_tokens)


def main(args: argparse.Namespace) -> None:
    """`rlhf chat`: one answer with --prompt, otherwise an interactive conversation."""
    sampling = SamplingArgs(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=not args.greedy,
    )
    model, tokenizer, description = load_chat_model(args.stage_dir)
    model.eval()
    torch.manual_seed(args.seed)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {args.stage_dir} has no chat template; this model cannot chat")
    opening = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": "Hi"}
    ]
    render(tokenizer, opening)  # a template that refuses the system message stops here, before the first turn
    out = sys.stdout
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        stream_reply(model, tokenizer, messages, sampling, out)
        return
    out.write(f"chatting with the {description}\n({HELP})\n")
    chat_loop(model, tokenizer, sampling, args.system, input, out)
