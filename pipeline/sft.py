"""Stage 2: supervised fine-tuning (LoRA, QLoRA or full) of a causal LM on chat demonstrations, with trl's SFTTrainer.

Reads the base model (the pretrain stage's final/ by default, or any causal LM by path or Hub id) and conversations
(the demo world's demonstrations, or messages / prompt-completion / Alpaca records from jsonl, parquet or the Hub).
The loss is on assistant tokens only by default. Evaluates the held-out loss; answers to held-out questions with
known answers (`sft.qa_eval`; on the demo world, facts that appear only in the crawl), checked with the shipped
`fact_accuracy` metric against the base model asked the same way; and, when the recipe names a judge, the share of
sampled answers the judge dislikes (the room left for reward and PPO).

Writes `run_dir/sft/final/`: the adapter and tokenizer at the root (`PeftModel.from_pretrained(base, final)`),
`merged/` (full weights, the shared base of the reward and PPO stages), `eval_samples.jsonl` and `stage.json`.

    rlhf sft recipes/demo.yaml sft.lora.r=8
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from pipeline import demo
from pipeline.checkpoints import begin_stage, final_dir, finishing, newest_checkpoint, stage_dir, write_stage_json
from pipeline.config import PipelineConfig
from pipeline.data.conversations import load_conversations, split_conversations
from pipeline.data.prompts import check_prompt, prompt_text, up_to_last_user_turn
from pipeline.data.records import SUFFIXES, BadRecord, is_local, read_jsonl, write_jsonl
from pipeline.errors import UserError
from pipeline.generation import SamplingArgs, generate
from pipeline.judge import NO_JUDGE, Judge, load_judge
from pipeline.metrics import load_metric
from pipeline.modeling import (
    apply_lora,
    check_context,
    check_model_source,
    default_dtype,
    fit_model_to_tokenizer,
    load_base_model,
    merge_lora,
)
from pipeline.preemption import raise_if_preempted
from pipeline.tokenizer import (
    ROLE_TOKENS,
    load_tokenizer,
    prepare_chat_tokenizer,
    render_chat,
    render_with_masks,
    turn_end_token,
)
from pipeline.tracking import count_parameters, is_main_process
from pipeline.trainers import train_from, trainer_checkpoint_callback

logger = logging.getLogger(__name__)

STAGE = "sft"


# --------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """The base model and the data this stage reads (paths or Hub ids)."""
    sft = cfg.sft
    if sft.dataset is None:
        raise UserError(
            "sft.dataset is not set: give a jsonl/json/parquet file or directory of conversations (messages, "
            "ShareGPT, prompt/completion or Alpaca records), a Hub dataset id, or 'demo'"
        )
    inputs = {"base": sft.base or str(final_dir(cfg, "pretrain"))}
    inputs["dataset"] = str(cfg.run_path / "world") if sft.dataset == demo.DEMO else sft.dataset
    if sft.eval_split and sft.dataset != demo.DEMO:
        if is_eval_file(sft.eval_split):
            inputs["eval_dataset"] = sft.eval_split
        elif is_local(sft.dataset):
            raise UserError(
                f"sft.eval_split: {sft.eval_split!r} is not an existing file or directory, and a split name means "
                f"something only for a Hub dataset (sft.dataset is the local {sft.dataset}); give a held-out "
                "file, or leave sft.eval_split unset to hold out sft.eval_share of the training data"
            )
    if sft.qa_eval:
        inputs["qa_eval"] = sft.qa_eval
    return inputs


def check_plan(cfg: PipelineConfig, inputs: dict[str, str]) -> None:
    """For --dry-run: `sft.max_seq_len` against the context of a local base, with the run's message, so a recipe
    that would stop at the start of the run is refused before it is queued. Only a base's config.json is read: a
    Hub base is not fetched, and one that a planned stage makes (pretrain) is checked when the stage runs."""
    if (Path(inputs["base"]).expanduser() / "config.json").is_file():
        check_context(cfg.sft.max_seq_len, inputs["base"], "sft.max_seq_len")


def is_eval_file(eval_split: str) -> bool:
    """Whether `sft.eval_split` names a file or directory of held-out conversations (else a Hub split name)."""
    return Path(eval_split).suffix.lower() in SUFFIXES or Path(eval_split).exists()


def load_data(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset | None, dict]:
    """Training and held-out conversations (bad records skipped and counted), and the skip report."""
    sft = cfg.sft
    if sft.dataset == demo.DEMO:
        files = demo.files(cfg)
        train_source, eval_source = str(files.sft_train), str(files.sft_eval)
    else:
        train_source, eval_source = sft.dataset, sft.eval_split
    train, train_report = load_conversations(
        train_source, tokenizer, sft.train_split, sft.dataset_config, sft.max_train_samples, what="sft.dataset"
    )
    report = {"train": train_report.as_dict()}
    if eval_source is None:
        train, held_out = split_conversations(train, sft.eval_share, cfg.seed)
    else:
        held_out, eval_report = load_conversations(
            eval_source if is_eval_file(eval_source) else sft.dataset,
            tokenizer,
            split=eval_source,
            hub_config=sft.dataset_config,
            limit=sft.max_eval_samples,
            what="sft.eval_split",
        )
        report["eval"] = eval_report.as_dict()
    if held_out is not None and sft.max_eval_samples > 0 and len(held_out) > sft.max_eval_samples:
        held_out = held_out.select(range(sft.max_eval_samples))
    return train, held_out, report


@dataclass
class TaskEval:
    """What the task evaluation asks: questions with known answers, and prompts whose answers the judge scores."""

    questions: list[dict[str, Any]] = field(default_factory=list)  # {"messages", "answer", ...}
    distractors: list[list[str]] | None = None  # per question, wrong values that mark an answer wrong
    judged: list[Any] = field(default_factory=list)  # prompts (messages)
    judge: Judge | None = None


# Held-out conversations whose first user turn the judge sees, when the dataset is not the demo's.
JUDGED_PROMPTS = 64


def load_task_eval(
    cfg: PipelineConfig, held_out: Dataset | None, tokenizer: PreTrainedTokenizerBase | None = None
) -> TaskEval:
    """The questions (`sft.qa_eval`, or the demo's held-out facts) and, with a judge, the prompts it judges: the
    demo's evaluation prompts, or the first user turns of held-out conversations. Given the tokenizer, a question
    its chat template cannot render is a one-line error now, not a traceback after training."""
    sft, task = cfg.sft, TaskEval(judge=load_judge(cfg))
    path = Path(sft.qa_eval) if sft.qa_eval else None
    files = demo.files(cfg) if sft.dataset == demo.DEMO else None
    if files is not None:
        path = path or files.heldout_qa
    if path is not None:
        if not path.is_file():
            raise UserError(f"sft.qa_eval: file not found: {path} (jsonl of {{messages, answer}} rows)")
        task.questions = read_jsonl(path)
        for n, row in enumerate(task.questions, start=1):
            if not isinstance(row.get("messages"), list) or not isinstance(row.get("answer"), str):
                raise UserError(f"sft.qa_eval: {path}:{n} needs 'messages' (a list) and 'answer' (a string)")
        if sft.qa_max_questions > 0:
            task.questions = task.questions[: sft.qa_max_questions]
        if tokenizer is not None:
            check_questions(task.questions, path, tokenizer)
        if files is not None and not sft.qa_eval:
            task.distractors = demo.distractors(cfg, task.questions)
    if task.judge is not None:
        if files is not None:
            task.judged = [row["messages"] for row in read_jsonl(files.ppo_eval_prompts)]
        elif held_out is not None:
            task.judged = [_first_turn(m) for m in held_out["messages"][:JUDGED_PROMPTS]]
    return task


def check_questions(questions: list[dict[str, Any]], path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Each question's messages must be a prompt (text turns ending with the user's) that the chat template renders;
    else a one-line error naming the question."""
    for n, row in enumerate(questions, start=1):
        try:
            row["messages"] = check_prompt(row["messages"])
            render_chat(tokenizer, row["messages"])
        except BadRecord as bad:
            raise UserError(
                f"sft.qa_eval: {path}:{n}: {bad}; a question is text turns ending with the user's, in the turns the "
                "model's chat template accepts (Gemma 2 has no system role)"
            ) from None


def _first_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation up to its first assistant turn: what the judge asks the model."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:
        return up_to_last_user_turn(messages[:first])
    except BadRecord:  # an assistant turn first: ask the whole conversation's last question
        return up_to_last_user_turn(messages)


# --------------------------------------------------------------------------------------------------------------
# Model and trainer


def load_tokenizer_and_model(
    cfg: PipelineConfig, base: str, train: Dataset | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, bool]:
    """The chat-ready tokenizer and the model to train (LoRA-wrapped unless full); True if tokens were added.

    `train` is needed only when `sft.trainable_tokens` names 'assistant' (the tokens of its assistant turns).
    """
    tokenizer, added = load_chat_tokenizer(base)
    return tokenizer, build_model(cfg, base, tokenizer, added, train), added


def load_chat_tokenizer(base: str) -> tuple[PreTrainedTokenizerBase, bool]:
    """The base's tokenizer with a chat template, EOS and a pad distinct from EOS; True if tokens were added."""
    check_model_source(base, what="sft.base")  # before the tokenizer, whose error would be less clear
    tokenizer = load_tokenizer(base)
    added = prepare_chat_tokenizer(tokenizer, base_generation_config(base))
    if added:
        logger.info("added tokens %s to the tokenizer; embeddings and LM head are trained and saved", added)
    return tokenizer, bool(added)


def base_generation_config(base: str) -> Any:
    """The base's generation_config.json (its end ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base)
    except (OSError, ValueError):
        return None


def build_model(
    cfg: PipelineConfig, base: str, tokenizer: PreTrainedTokenizerBase, added: bool, train: Dataset | None = None
) -> PreTrainedModel:
    """The base (4-bit for QLoRA, random weights for the random_init control) fitted to the tokenizer, with LoRA."""
    sft = cfg.sft
    set_seed(cfg.seed)  # random init and LoRA init draw from the global generator
    model = load_base_model(base, quantize_4bit=sft.finetune == "qlora", random_init=sft.random_init, what="sft.base")
    fit_model_to_tokenizer(model, tokenizer)
    if sft.finetune != "full":
        rows = token_ids(tokenizer, sft.trainable_tokens, train)
        model = apply_lora(
            model,
            sft.lora,
            "CAUSAL_LM",
            train_embeddings=added,
            gradient_checkpointing=sft.gradient_checkpointing,
            trainable_token_ids=rows,
            key="sft.lora",
        )
        if rows and not added:
            logger.info("sft: training the embedding rows of %d tokens (sft.trainable_tokens)", len(set(rows)))
    trainable, total = count_parameters(model)
    logger.info(
        "sft: %s of %s, %d of %d parameters trainable (%.2f%%)",
        sft.finetune,
        base,
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return model


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[str], train: Dataset | None = None) -> list[int]:
    """Ids of `sft.trainable_tokens`; an unknown token is a one-line error.

    'chat' stands for the role tokens and EOS; 'assistant' for every token of the assistant turns of `train` (the
    tokens the model must learn to emit; rows of tokens it never emits in SFT, such as facts it knows only from
    pretraining, are left as they are).
    """
    ids: set[int] = set()
    names: list[str] = []
    for token in tokens:
        if token == "chat":
            turn = turn_end_token(tokenizer)
            names += [t for t in ROLE_TOKENS.values() if t in tokenizer.get_vocab()] + [tokenizer.eos_token]
            names += [turn] if turn is not None else []
        elif token == "assistant":
            if train is None:
                raise ValueError("sft.trainable_tokens 'assistant' needs the training conversations")
            ids |= assistant_token_ids(tokenizer, train)
        else:
            names.append(token)
    vocab = tokenizer.get_vocab()
    unknown = [t for t in names if t not in vocab]
    if unknown:
        raise UserError(
            f"sft.trainable_tokens: {unknown} are not tokens of the tokenizer (give special tokens it has)"
        )
    return sorted(ids | {vocab[t] for t in names})


def assistant_token_ids(tokenizer: PreTrainedTokenizerBase, train: Dataset) -> set[int]:
    """Every token id inside assistant turns (what the loss trains the model to emit), via the template's mask."""
    ids: set[int] = set()
    for messages in train["messages"]:
        try:
            tokens, mask = render_with_masks(tokenizer, messages)
        except BadRecord:  # skipped from training too (tokenize_conversations)
            continue
        ids.update(t for t, m in zip(tokens, mask, strict=True) if m)
    return ids


def tokenize_conversations(
    data: Dataset, tokenizer: PreTrainedTokenizerBase, sft: Any
) -> tuple[Dataset, dict[str, Any]]:
    """`input_ids` and `assistant_masks` of each conversation as the tokenizer's own template renders it
    (`pipeline.tokenizer.render_with_masks`), beside its `messages`; trl's SFTTrainer turns the masks into labels.

    A conversation the template cannot render or whose assistant spans cannot be found is skipped with its reason; one
    longer than `sft.max_seq_len` is cut at it (`sft.long_records="truncate"`) or skipped ("skip"). All are counted.
    Without `sft.assistant_only_loss` the mask covers every token.
    """
    max_seq_len, rows, skipped, truncated = sft.max_seq_len, [], {}, 0
    for messages in data["messages"]:
        try:
            ids, mask = render_with_masks(tokenizer, messages)
        except BadRecord as bad:
            skipped[bad.kind] = skipped.get(bad.kind, 0) + 1
            continue
        if len(ids) > max_seq_len:
            if sft.long_records == "skip":
                skipped["longer than sft.max_seq_len"] = skipped.get("longer than sft.max_seq_len", 0) + 1
                continue
            ids, mask, truncated = ids[:max_seq_len], mask[:max_seq_len], truncated + 1
        if not any(mask):
            key = "no assistant token within sft.max_seq_len"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        mask = mask if sft.assistant_only_loss else [1] * len(ids)
        rows.append({"messages": messages, "input_ids": ids, "assistant_masks": mask})
    report = {"read": len(data), "kept": len(rows), "skipped": skipped, "truncated": truncated}
    for reason, count in skipped.items():
        logger.warning("sft: skipped %d conversation(s): %s", count, reason)
    if truncated:
        logger.warning("sft: cut %d conversation(s) at sft.max_seq_len=%d", truncated, max_seq_len)
    if not rows:
        raise UserError(
            f"sft: no conversation left after rendering with the chat template (skipped: {skipped}); "
            "check the data's roles against the model's template, or raise sft.max_seq_len"
        )
    return Dataset.from_list(rows), report


def to_trl_args(cfg: PipelineConfig, has_eval: bool) -> trl.SFTConfig:
    """Our `SFTConfig` as trl's; checkpoints go to `run_dir/sft/checkpoint-N/`, pruned by us (never the newest)."""
    sft = cfg.sft
    common = sft.trainer_kwargs(str(stage_dir(cfg, STAGE)), cfg.seed)
    if not has_eval:
        common.update(eval_strategy="no", eval_steps=None)
    return trl.SFTConfig(
        **common,
        data_seed=cfg.seed,
        bf16=default_dtype() == torch.bfloat16,
        dataloader_pin_memory=torch.cuda.is_available(),
        max_length=sft.max_seq_len,
        packing=sft.packing,
        assistant_only_loss=False,  # the data carries its own assistant_masks (tokenize_conversations)
        disable_tqdm=True,
    )


TOKENIZED = ["input_ids", "assistant_masks"]  # what the trainer reads of a tokenized conversation


def _tokenized(data: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig) -> Dataset:
    if "input_ids" not in data.column_names:  # conversations not yet rendered (run() renders and counts them first)
        data, _ = tokenize_conversations(data, tokenizer, cfg.sft)
    return data.select_columns(TOKENIZED)


def build_trainer(
    cfg: PipelineConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Dataset, held_out
) -> trl.SFTTrainer:
    return trl.SFTTrainer(
        model=model,
        args=to_trl_args(cfg, held_out is not None),
        train_dataset=_tokenized(train, tokenizer, cfg),
        eval_dataset=None if held_out is None else _tokenized(held_out, tokenizer, cfg),
        processing_class=tokenizer,
        callbacks=[trainer_checkpoint_callback(stage_dir(cfg, STAGE), cfg.sft.save_total_limit)],
    )


# --------------------------------------------------------------------------------------------------------------
# Task evaluation: held-out questions and the gold judge


def answer_questions(model, tokenizer, prompts: list[Any], cfg: PipelineConfig, sample: bool = False) -> list[str]:
    """Answers to chat prompts: greedy, or sampled at temperature 1 (seeded) to see the policy's spread."""
    if not prompts:
        return []
    torch.manual_seed(cfg.seed)
    sampling = SamplingArgs(max_new_tokens=cfg.sft.qa_max_new_tokens, do_sample=sample)
    return generate(model, tokenizer, prompts, sampling, batch_size=cfg.sft.qa_batch_size).texts


def score_answers(questions: list[dict], answers: list[str], distractors: list[list[str]] | None) -> dict[str, Any]:
    """fact_accuracy of `answers` (an answer naming a distractor, a wrong value, is wrong)."""
    result = load_metric("fact_accuracy").compute(
        predictions=answers, references=[q["answer"] for q in questions], distractors=distractors
    )
    return {"accuracy": result["fact_accuracy"], "correct": result["correct"], "total": result["total"]}


def judge_answers(prompts: list[Any], answers: list[str], judge: Judge) -> dict[str, float]:
    """The judge's view of answers: mean score, the share it disprefers, and the share of each named fault."""
    verdicts = [judge.judge(prompt_text(p), a) for p, a in zip(prompts, answers, strict=True)]
    n = max(len(verdicts), 1)
    facts = [v for v in verdicts if v.kind == "fact"]

    def share(fault: str, among: list[Any]) -> float:
        return sum(fault in v.faults for v in among) / max(len(among), 1)

    return {
        "gold_mean_score": sum(v.score for v in verdicts) / n,
        "dispreferred_share": share("dispreferred", verdicts),
        "gold_wrong_share": share("wrong", facts),
        "gold_rude_share": share("rude", verdicts),
        "gold_insulting_share": share("insulting", verdicts),
        "gold_impolite_share": share("impolite", verdicts),
        "gold_prompts": len(verdicts),
    }


def evaluate_task(model, tokenizer, cfg: PipelineConfig, task: TaskEval, prefix: str) -> tuple[dict, list[dict]]:
    """QA accuracy (greedy) and the judge's view (of answers sampled at temperature 1, and greedy) of one model.

    Metric keys start with `prefix`. The sampled figures describe the policy the reward and PPO stages sample from.
    """
    metrics: dict[str, Any] = {}
    samples = []
    if task.questions:
        answers = answer_questions(model, tokenizer, [q["messages"] for q in task.questions], cfg)
        qa = score_answers(task.questions, answers, task.distractors)
        metrics.update({f"{prefix}heldout_accuracy": qa["accuracy"], f"{prefix}heldout_questions": qa["total"]})
        samples = [
            {"question": q["messages"][-1]["content"], "gold": q["answer"], "answer": a}
            for q, a in zip(task.questions, answers, strict=True)
        ]
    if task.judge is not None and task.judged:
        answers = answer_questions(model, tokenizer, task.judged, cfg, sample=True)
        metrics.update({prefix + k: v for k, v in judge_answers(task.judged, answers, task.judge).items()})
        greedy = judge_answers(task.judged, answer_questions(model, tokenizer, task.judged, cfg), task.judge)
        metrics.update({f"{prefix}greedy_{k}": greedy[k] for k in ("dispreferred_share", "gold_mean_score")})
    return metrics, samples


# --------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, rerun: bool = False) -> Path:
    """Fine-tune, evaluate and save; skip when finished with the same settings. Returns `run_dir/sft/final/`."""
    sft, sdir = cfg.sft, stage_dir(cfg, STAGE)
    inputs = resolve_inputs(cfg)
    identity, done = begin_stage(cfg, STAGE, inputs, rerun)
    if done is not None:
        return done
    base = inputs["base"]
    logger.info("sft settings: %s", json.dumps(identity["settings"]))
    check_model_source(base, what="sft.base")
    check_context(sft.max_seq_len, base, "sft.max_seq_len")
    tokenizer, added = load_chat_tokenizer(base)
    train, held_out, data_report = load_data(cfg, tokenizer)
    train, data_report["train_tokens"] = tokenize_conversations(train, tokenizer, sft)
    if held_out is not None:
        held_out, data_report["eval_tokens"] = tokenize_conversations(held_out, tokenizer, sft)
    model = build_model(cfg, base, tokenizer, added, train)
    logger.info("sft data: %d training and %d held-out conversations", len(train), len(held_out or []))
    task = load_task_eval(cfg, held_out, tokenizer)
    if task.judge is None:
        logger.info("sft: %s", NO_JUDGE)

    base_metrics: dict[str, Any] = {}
    if sft.qa_eval_base and sft.finetune == "full" and is_main_process():
        base_metrics, _ = evaluate_task(model, tokenizer, cfg, task, "base_")  # LoRA bases: later, adapters off
    trainer = build_trainer(cfg, model, tokenizer, train, held_out)
    resume = newest_checkpoint(sdir)
    if resume is not None:
        logger.info("resuming sft from %s", resume)
    result = train_from(trainer, resume)
    raise_if_preempted(sdir)
    metrics: dict[str, Any] = {"train_loss": result.training_loss, **_rounded(result.metrics)}
    if held_out is not None:
        metrics.update(_rounded(trainer.evaluate()))
    if not is_main_process():
        return final_dir(cfg, STAGE)

    model = trainer.model
    task_metrics, samples = evaluate_task(model, tokenizer, cfg, task, "")
    if sft.qa_eval_base and sft.finetune != "full" and task_metrics:
        with model.disable_adapter():
            base_metrics, base_samples = evaluate_task(model, tokenizer, cfg, task, "base_")
        for row, base_row in zip(samples, base_samples, strict=True):
            row["base_answer"] = base_row["answer"]
    trainable, total = count_parameters(model)
    metrics.update(
        task_metrics,
        **base_metrics,
        data=data_report,
        trainable_params=trainable,
        total_params=total,
        world_size=trainer.args.world_size,
        tokens_added=added,
    )
    if task.judge is None:
        metrics["judge"] = NO_JUDGE
    for key in (
        "heldout_accuracy",
        "base_heldout_accuracy",
        "dispreferred_share",
        "base_dispreferred_share",
        "eval_loss",
    ):
        if key in metrics:
            logger.info("sft %s: %.4f", key, metrics[key])
    return save_final(cfg, identity, model, tokenizer, metrics, samples, base)


def save_final(cfg: PipelineConfig, identity: dict, model, tokenizer, metrics: dict, samples: list, base: str) -> Path:
    """Write final/: adapter (or full model) + tokenizer, merged/, eval_samples.jsonl, then stage.json."""
    sft = cfg.sft
    with finishing(cfg, STAGE) as out:
        write_jsonl(out / "eval_samples.jsonl", samples)
        if sft.finetune == "full":
            model.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
            for file in (out / "merged").iterdir():  # the same model at the root: hard links, no second copy
                os.link(file, out / file.name)
            contents = "model+merged"
        else:
            model.save_pretrained(out)
            (out / "README.md").unlink(missing_ok=True)  # peft's placeholder card; `rlhf publish` writes the real one
            tokenizer.save_pretrained(out)
            merge_lora(model, tokenizer, out / "merged", base=base)
            contents = "adapter+merged"
        write_stage_json(
            out, identity, metrics, contents=contents, extra={"finetune": sft.finetune, "random_init": sft.random_init}
        )
    final = final_dir(cfg, STAGE)
    logger.info("sft finished: %s", final)
    return final


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
