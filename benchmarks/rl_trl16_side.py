"""The trl 1.16 sides of benchmarks/ppo_vs_trl.py: `trl.RLOOTrainer` or `trl.GRPOTrainer` on the same inputs.

Runs in the project's own environment (.venv: trl 1.16 beside the project; trl 1.12 lives apart, in
benchmarks/.venv-trl112). It reads a spec written by ppo_vs_trl.py and sets trl up as its documentation does for a
LoRA policy and a reward function:

- policy: the base (a causal LM) with a fresh LoRA adapter from `peft_config`; the reference is the base with the
  adapter disabled (trl does this itself for a PEFT model), as in our stage;
- prompts: the rendered chat prompts as text (our stage's token ids decoded); trl tokenizes them again, and the
  script refuses to run unless that gives our ids back;
- reward: one `reward_funcs` callable that scores prompt + completion with our reward model
  (`pipeline.modeling.load_reward_model`, merged into its base, fed what our stage feeds it:
  `pipeline.modeling.reward_scores`), normalised with the reward stage's reward_stats, minus the missing-EOS
  penalty for a completion that did not end (ours applies both; trl 1.16 has neither);
- one update = one generation batch of rollout_batch_size completions (num_generations per prompt), split into
  mini-batches of mini_batch_size (steps_per_generation) and passed over ppo_epochs times (num_iterations).

It writes result.json (the wall-clock and CPU time at the end of every optimiser step, trl's logged metrics, peak
RSS, parameter counts) and the policy adapter (policy/, loadable by peft) into the spec's out_dir.

    .venv/bin/python benchmarks/rl_trl16_side.py SPEC.json
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM

from pipeline.data.prompts import read_prompts
from pipeline.modeling import load_reward_model, reward_scores
from pipeline.ppo.rollout import prepare_prompts
from pipeline.tokenizer import end_ids, load_tokenizer


class Clock(transformers.TrainerCallback):
    """Wall-clock and process CPU time at the end of every optimiser step, and trl's logged metrics."""

    def __init__(self):
        self.steps, self.cpu, self.logs = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.time())
        self.cpu.append(time.process_time())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


class RewardModelScore:
    """trl's reward function: our reward model's score of (prompt, completion), normalised as our stage does."""

    __name__ = "reward_model"  # trl logs a reward function under its name

    def __init__(self, spec: dict, records: list[dict], ends: list[int]):
        model, self.tokenizer = load_reward_model(spec["reward"])
        self.model = model.merge_and_unload() if isinstance(model, peft.PeftModel) else model
        self.model.requires_grad_(False)
        self.records, self.ends = records, set(ends)
        self.max_len, self.batch = spec["reward_max_len"], spec["settings"]["forward_batch_size"]
        self.affine, self.penalty = spec["score_affine"], spec["settings"]["missing_eos_penalty"]
        bf16 = spec["precision"] == "bf16"  # ours scores under the same autocast as its other passes
        self.precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def __call__(self, prompts, completions, completion_ids, index, **kwargs) -> list[float]:
        scores = reward_scores(
            self.model,
            self.tokenizer,
            [self.records[i]["prompt"] for i in index],
            list(completions),
            self.max_len,
            self.batch,
            self.precision,
        )
        if self.affine:
            scores = (scores - self.affine[0]) / self.affine[1]
        ended = torch.tensor([bool(ids) and ids[-1] in self.ends for ids in completion_ids])
        return (scores - self.penalty * (~ended).float()).tolist()


def load_prompts(spec: dict, tokenizer) -> tuple[Dataset, list[dict]]:
    """The training prompts as our stage prepares them; rows {"prompt": rendered text, "index": record}."""
    records, _ = read_prompts(spec["prompts"], "training prompts")
    prepared = prepare_prompts(records, tokenizer, spec["max_prompt_len"], spec["long_prompts"], "training prompts")
    texts = tokenizer.batch_decode(prepared.ids, skip_special_tokens=False)
    again = tokenizer(texts)["input_ids"]  # what trl's _tokenize_prompts does with a text prompt
    differ = sum(a != b for a, b in zip(again, prepared.ids, strict=True))
    if differ:
        raise SystemExit(f"{differ} of {len(texts)} prompts tokenize to other ids than our stage's; not comparable")
    rows = [{"prompt": text, "index": i} for i, text in enumerate(texts)]
    return Dataset.from_list(rows), prepared.records


def build_config(spec: dict, out: Path):
    """trl's RLOOConfig or GRPOConfig with our settings (names mapped in the comments)."""
    s, kind = spec["settings"], spec["kind"]
    rollout, mini, epochs = s["rollout_batch_size"], s["mini_batch_size"], s["ppo_epochs"]
    bf16 = spec["precision"] == "bf16"
    common = dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=mini,  # completions per optimiser step (ppo.mini_batch_size)
        gradient_accumulation_steps=1,
        steps_per_generation=rollout // mini,  # one generation batch = ppo.rollout_batch_size completions
        num_iterations=epochs,  # passes over each generation batch (ppo.ppo_epochs)
        max_steps=s["num_updates"] * (rollout // mini) * epochs,
        num_generations=s["samples_per_prompt"],
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler_type"],
        warmup_steps=0,
        weight_decay=s["weight_decay"],
        adam_epsilon=1e-5,  # ours (the PPO implementation detail); transformers' default is 1e-8
        max_grad_norm=s["max_grad_norm"],
        beta=s["kl_coef"],
        epsilon=s["cliprange"],
        disable_dropout=True,  # our stage trains with dropout off (LoRA dropout 0; Llama has none)
        bf16=bf16,  # trl defaults to bf16 autocast; our stage runs float32 unless ppo.mixed_precision=bf16
        fp16=False,
        gradient_checkpointing=False,  # trl's default is True; our stage does not checkpoint activations
        use_cpu=not torch.cuda.is_available(),
        seed=spec["seed"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the reward function reads the "index" column
    )
    if kind == "rloo":
        # sequence-level KL penalty in the reward (k1 summed over tokens, as ours), leave-one-out baseline, then
        # advantages normalised over the generation batch (ppo.whiten_advantages)
        return trl.RLOOConfig(**common, normalize_advantages=s["whiten_advantages"])
    # grpo: score normalised in its group (std with Bessel's correction, + 1e-4, as ours), k3 KL to the reference
    # as a loss term without trl's importance-sampling correction (ours has none), and the loss averaged over the
    # mini-batch's tokens ("bnpo" without accumulation: our masked mean over a mini-batch)
    return trl.GRPOConfig(
        **common,
        scale_rewards="group",
        loss_type="bnpo",
        importance_sampling_level="token",
        use_bias_correction_kl=False,
    )


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(spec["policy"])
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ends = end_ids(tokenizer, policy)
    # The saved configs say use_cache=False (training); generation needs the KV cache, as our stage asks for it.
    policy.config.use_cache = True
    policy.generation_config.use_cache = True
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = ends  # stop where our stage stops: EOS and the template's end of turn
    train, records = load_prompts(spec, tokenizer)
    reward = RewardModelScore(spec, records, ends)

    args = build_config(spec, out)
    trainer_class = trl.RLOOTrainer if spec["kind"] == "rloo" else trl.GRPOTrainer
    clock = Clock()
    trainer = trainer_class(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[clock],
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **spec["lora"]),
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for m in (trainer.model, reward.model) for p in m.parameters())
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.model.save_pretrained(str(out / "policy"))
    result = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "train_seconds": seconds,
        "step_times": clock.steps,
        "step_cpu_times": clock.cpu,
        "steps_per_update": (spec["settings"]["rollout_batch_size"] // spec["settings"]["mini_batch_size"])
        * spec["settings"]["ppo_epochs"],
        "logs": clock.logs,
        "trainable_parameters": trainable,
        "parameters_in_memory": total,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
