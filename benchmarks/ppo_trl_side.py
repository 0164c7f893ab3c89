"""The trl side of benchmarks/ppo_vs_trl.py: `trl.experimental.ppo.PPOTrainer` (trl 1.12.0) on the same inputs.

Runs inside the benchmark's own virtual environment (benchmarks/.venv-trl112, trl 1.12.0 beside the project's
torch, transformers, peft and accelerate versions); it imports nothing from the project. It reads a spec written by
ppo_vs_trl.py and sets trl up the way trl's own example (examples/scripts/ppo/ppo.py with --use_peft) does:

- policy: the base (a causal LM) with a fresh LoRA adapter from `peft_config`; reference: None, so trl disables the
  adapter (the reference is the base, as in our stage);
- reward model and value model: two full sequence-classification models loaded from the reward model merged into
  the base (trl trains the value model in full); when the spec gives the reward stage's (mean, std), the reward
  model's score head is rescaled to output (score - mean) / std, the normalisation our stage applies.

It writes result.json (per-update wall-clock times, trl's logged metrics, peak RSS, parameter counts) and the policy
adapter (policy/, loadable by peft) into the spec's out_dir.

    benchmarks/.venv-trl112/bin/python benchmarks/ppo_trl_side.py SPEC.json
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402


class Clock(transformers.TrainerCallback):
    """Wall-clock and process CPU time at the end of every PPO update, and trl's logged metrics."""

    def __init__(self):
        self.steps, self.cpu, self.logs = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.time())
        self.cpu.append(time.process_time())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def normalised_score_head(model, mean: float, std: float) -> None:
    """Replace the score head s(h) = w.h by (w.h - mean) / std (a linear layer with a bias)."""
    old = model.score
    head = torch.nn.Linear(old.in_features, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight / std)
        head.bias.fill_(-mean / std)
        if old.bias is not None:
            head.bias.add_(old.bias / std)
    model.score = head


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    s = spec["settings"]

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")  # trl's example pads left
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    # The saved configs say use_cache=False (training); generation needs the KV cache, as our stage asks for it.
    policy.config.use_cache = True
    policy.generation_config.use_cache = True
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        spec["reward"], num_labels=1, dtype=torch.float32
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.get("score_affine"):
        normalised_score_head(reward_model, *spec["score_affine"])
    reward_model.requires_grad_(False)

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    train = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    rows = [json.loads(line) for line in Path(spec["eval_prompts"]).read_text().splitlines() if line.strip()]
    heldout = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])

    rollout, mini = s["rollout_batch_size"], s["mini_batch_size"]
    args = PPOConfig(
        output_dir=str(out / "trainer"),
        # one rollout batch per update = per_device_train_batch_size * gradient_accumulation_steps; one optimiser
        # step per mini-batch: num_mini_batches = rollout / mini with no accumulation (with accumulation, trl's
        # accelerator.accumulate would step once per gradient_accumulation_steps micro-batches across mini-batches)
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // mini,
        total_episodes=s["num_updates"] * rollout,
        num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=s["forward_batch_size"],
        response_length=s["max_new_tokens"],
        stop_token="eos",
        temperature=s["temperature"],
        missing_eos_penalty=s["missing_eos_penalty"] or None,
        learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler_type"],
        warmup_steps=0,
        weight_decay=s["weight_decay"],
        adam_epsilon=1e-5,  # ours (the PPO implementation detail); trl's default is 1e-8
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        whiten_rewards=s["whiten_rewards"],
        gamma=s["gamma"],
        lam=s["lam"],
        cliprange=s["cliprange"],
        cliprange_value=s["cliprange_value"],
        vf_coef=s["vf_coef"],
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        bf16=spec.get("bf16", False),  # trl defaults to bf16 autocast; the benchmark's --precision decides
        fp16=False,
        gradient_checkpointing=False,  # trl's default is True; our stage does not checkpoint activations
        use_cpu=not torch.cuda.is_available(),
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    peft_config = peft.LoraConfig(task_type="CAUSAL_LM", **spec["lora"])
    clock = Clock()
    # PPOTrainer draws the fresh LoRA weights before it seeds anything itself; seed them, as our stage does.
    transformers.set_seed(spec["seed"])
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=train,
        value_model=value_model,
        eval_dataset=heldout,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for m in (trainer.model, reward_model) for p in m.parameters())
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.policy_model.save_pretrained(str(out / "policy"))
    result = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "train_seconds": seconds,
        "update_times": clock.steps,
        "update_cpu_times": clock.cpu,
        "logs": clock.logs,
        "trainable_parameters": trainable,
        "parameters_in_memory": total,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
