"""pipeline/ppo/memory.py: gradient checkpointing in the passes with gradients only, micro-batches by token budget
(the gradient does not depend on the cut), and the peak memory of an update."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline.config import LoraArgs, PPOConfig
from pipeline.ppo import memory


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_tokenizer):
    from test_ppo_stage import _save_upstream

    root = tmp_path_factory.mktemp("upstream")
    _save_upstream(root, tiny_tokenizer, num_hidden_layers=4)
    return root


def _roles(upstream, **settings):
    from pipeline.ppo.roles import build_roles

    pcfg = PPOConfig(lora=LoraArgs(r=4, alpha=8), **settings)
    torch.manual_seed(0)
    roles = build_roles(pcfg, str(upstream / "sft" / "final" / "merged"), str(upstream / "reward" / "final"), "cpu")
    with torch.no_grad():  # a policy adapter that is not zero, so its gradients are not trivial
        for name, param in roles.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.normal_(0, 0.1)
    return pcfg, roles


class _Rollout(types.SimpleNamespace):
    def __len__(self) -> int:
        return self.n


def _rollout(n: int, vocab: int, seed: int = 0) -> _Rollout:
    """Episodes of varied lengths as collect_rollout leaves them: prompts left-padded, responses right-padded."""
    g = torch.Generator().manual_seed(seed)
    p_width, r_width = 12, 10
    p_len = torch.randint(2, p_width + 1, (n,), generator=g)
    r_len = torch.randint(1, r_width + 1, (n,), generator=g)
    prompt_mask = (torch.arange(p_width) >= p_width - p_len[:, None]).long()
    response_mask = (torch.arange(r_width) < r_len[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (n, p_width), generator=g) * prompt_mask
    response_ids = torch.randint(3, vocab, (n, r_width), generator=g) * response_mask
    per_token = {k: torch.randn(n, r_width, generator=g, dtype=torch.float64) for k in ("advantages", "values")}
    return _Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=-torch.rand(n, r_width, generator=g, dtype=torch.float64) * 5,
        returns=per_token["values"] + torch.randn(n, r_width, generator=g, dtype=torch.float64),
        n=n,
        kl_loss_coef=0.0,
        engine_logprobs=None,
        **per_token,
    )


def _gradients(roles, pcfg, rollout) -> list[torch.Tensor]:
    """The gradients of one ppo_update mini-batch (the optimiser step records them instead of stepping)."""
    from pipeline.ppo.optimise import ppo_update

    seen = []
    optimizer = types.SimpleNamespace(
        step=lambda: seen.append([p.grad.clone() for p in roles.trainable_parameters()]),
        zero_grad=lambda set_to_none=True: [setattr(p, "grad", None) for p in roles.trainable_parameters()],
    )
    scheduler = types.SimpleNamespace(step=lambda: None)
    ppo_update(roles, rollout, pcfg, optimizer, scheduler, None, 1)
    assert len(seen) == 1
    return seen[0]


def _policy_and_value_loss(roles, ids, mask, p_len):
    logprobs, entropy = roles.policy_logprobs(ids, mask, p_len, 1.0, with_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    roles.values(ids, mask, p_len).square().sum().backward()


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_checkpointed_gradients_equal_plain_ones_and_dropout_stays_off(upstream):
    from pipeline.ppo.rollout import episode_inputs

    pcfg, roles = _roles(upstream)
    r = _rollout(6, len(roles.tokenizer))
    ids, mask, p_len, _ = episode_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, range(6))
    grads = {}
    for on in (False, True):
        assert memory.set_gradient_checkpointing((roles.model, roles.critic), on) == 4
        _policy_and_value_loss(roles, ids, mask, p_len)
        grads[on] = [p.grad.clone() for p in roles.trainable_parameters()]
        for p in roles.trainable_parameters():
            p.grad = None
    assert all(g.abs().sum() > 0 for g in grads[False][:4])
    for plain, checkpointed in zip(grads[False], grads[True], strict=True):
        assert torch.equal(checkpointed, plain)  # the same operations run again: bit for bit
    assert not any(m.training for m in roles.model.modules())  # eval mode throughout: dropout off


def test_checkpointing_acts_only_with_gradients(upstream, monkeypatch):
    from pipeline.ppo.rollout import episode_inputs

    pcfg, roles = _roles(upstream)
    r = _rollout(4, len(roles.tokenizer))
    ids, mask, p_len, _ = episode_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, range(4))
    calls = []
    original = memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    memory.set_gradient_checkpointing((roles.model,), True)
    with torch.no_grad():  # the rollout's passes
        roles.reference_logprobs(ids, mask, p_len, 1.0)
        roles.values(ids, mask, p_len)
    assert calls == []
    roles.policy_logprobs(ids, mask, p_len, 1.0)[0].sum().backward()
    assert len(calls) == 4  # one per decoder layer
    memory.set_gradient_checkpointing((roles.model,), False)
    roles.policy_logprobs(ids, mask, p_len, 1.0)[0].sum().backward()
    assert len(calls) == 4  # switched off again


def test_checkpointing_keeps_far_fewer_activations_for_backward(upstream):
    """Bytes saved for backward by a policy forward (parameters excluded): a deterministic stand-in for memory."""
    from pipeline.ppo.rollout import episode_inputs

    pcfg, roles = _roles(upstream)
    r = _rollout(8, len(roles.tokenizer))
    ids, mask, p_len, _ = episode_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, range(8))
    params = {p.data_ptr() for p in roles.model.parameters()}
    saved = {}
    for on in (False, True):
        total = [0]

        def pack(t, total=total):
            if t.data_ptr() not in params:
                total[0] += t.numel() * t.element_size()
            return t

        memory.set_gradient_checkpointing((roles.model,), on)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logprobs, _ = roles.policy_logprobs(ids, mask, p_len, 1.0)
        logprobs.sum().backward()
        saved[on] = total[0]
    # 4 layers keep only their inputs; what is left is the embedding, final norm, LM head and log-softmax
    assert saved[True] < 0.4 * saved[False], saved


def test_recomputing_under_another_role_is_refused(upstream):
    from pipeline.ppo.roles import VALUE, activate_adapter
    from pipeline.ppo.rollout import episode_inputs

    pcfg, roles = _roles(upstream)
    r = _rollout(2, len(roles.tokenizer))
    ids, mask, p_len, _ = episode_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, range(2))
    memory.set_gradient_checkpointing((roles.model,), True)
    logprobs, _ = roles.policy_logprobs(ids, mask, p_len, 1.0)
    activate_adapter(roles.model, VALUE)
    with pytest.raises(RuntimeError, match="backpropagate before switching roles"):
        logprobs.sum().backward()


# --------------------------------------------------------------------------------------------------------------
# Micro-batches by token budget


def test_micro_batches_respect_the_budget_and_use_every_episode_once():
    g = torch.Generator().manual_seed(3)
    p, r = torch.randint(1, 40, (50,), generator=g), torch.randint(1, 30, (50,), generator=g)
    batch = torch.randperm(50, generator=g)[:32]
    for budget in (1, 60, 200, 1000, 10**6):
        parts = memory.split_micro_batches(batch, p, r, 4, budget)
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        for rows in parts:
            assert len(rows) == 1 or memory.padded_tokens(p[rows], r[rows]) <= budget
        if budget == 1:
            assert len(parts) == 32  # every episode is longer: one each
        if budget == 10**6:
            assert len(parts) == 1
        lengths = [(p[rows] + r[rows]).tolist() for rows in parts]
        assert sum(lengths, []) == sorted(sum(lengths, []))  # length-grouped: sorted, cut in order
    parts = memory.split_micro_batches(batch, p, r, 5, 0)  # no budget: by episode count, in order
    assert [len(x) for x in parts] == [5] * 6 + [2] and torch.equal(torch.cat(parts), batch)


def test_token_weights_sum_to_one_in_proportion_to_response_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    weights = memory.token_weights(mask, [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3])])
    assert weights == pytest.approx([4 / 10, 4 / 10, 2 / 10])


@pytest.mark.parametrize(
    "split",
    [
        {"micro_batch_tokens": 40},
        {"micro_batch_tokens": 90},
        {"gradient_accumulation_steps": 4},
        {"pack_sequences": True},
        {"pack_sequences": True, "micro_batch_tokens": 40},
    ],
)
@pytest.mark.parametrize("critic", ["adapter", "trunk", "head", "rloo-sequence"])
def test_gradient_of_a_mini_batch_does_not_depend_on_its_cut(upstream, split, critic):
    """The mini-batch's token mean (its response mean with ratio_level=sequence), however it is cut."""
    common = dict(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, max_grad_norm=1e9, entropy_coef=0.01)
    if critic == "rloo-sequence":
        common.update(advantage="rloo", samples_per_prompt=2, ratio_level="sequence", entropy_coef=0.0)
    else:
        common.update(critic=critic)
    pcfg, roles = _roles(upstream, **common)
    roles.model.double()
    if roles.value_head is not None:
        roles.value_head.double()
    r = _rollout(8, len(roles.tokenizer))
    if critic == "rloo-sequence":  # old log-probs near the policy's: a random response ratio would be clipped
        from pipeline.ppo.rollout import episode_inputs

        ids, mask, p_len, r_len = episode_inputs(
            r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, range(8)
        )
        with torch.no_grad():
            logprobs = roles.policy_logprobs(ids, mask, p_len, 1.0, False)[0].double()
        r.logprobs = logprobs + 0.01 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(1))
    whole = _gradients(roles, pcfg, r)
    cut = _gradients(roles, PPOConfig(lora=pcfg.lora, **common, **split), r)
    assert len(memory.split_micro_batches(torch.arange(8), r.prompt_mask.sum(1), r.response_mask.sum(1), 2, 40)) > 2
    assert all(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, cut, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)  # log-softmax runs in fp32


def test_packed_budget_counts_real_tokens():
    p, r = torch.tensor([10, 3, 7, 2]), torch.tensor([5, 1, 4, 6])
    parts = memory.split_micro_batches(torch.arange(4), p, r, 4, 20, packed=True)
    assert [x.tolist() for x in parts] == [[1, 3], [2], [0]]  # sorted by length: 4, 8 | 11 | 15
    assert all(memory.padded_tokens(p[x], r[x], packed=True) <= 20 for x in parts)


# --------------------------------------------------------------------------------------------------------------
# Packed micro-batches


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_episodes_give_the_padded_log_probs_and_values(upstream, attention):
    from pipeline.ppo.rollout import episode_inputs

    pcfg, roles = _roles(upstream)
    roles.model.get_base_model().config._attn_implementation = attention
    r = _rollout(5, len(roles.tokenizer))
    rows = torch.tensor([4, 0, 2, 1, 3])
    ids, mask, p_len, r_len = episode_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, rows)
    packed = memory.pack_episodes(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, rows)
    assert packed.input_ids.shape == (1, int(r.prompt_mask[rows].sum() + r.response_mask[rows].sum()))
    resp = r.response_mask[rows, :r_len].bool()
    with torch.no_grad():
        padded_lp, padded_ent = roles.policy_logprobs(ids, mask, p_len, 1.0, with_entropy=True)
        packed_lp, packed_ent, _ = memory.packed_policy_logprobs(roles, packed, 1.0, with_entropy=True)
        padded_v, packed_v = roles.values(ids, mask, p_len), memory.packed_values(roles, packed)
    for a, b in ((padded_lp, packed_lp), (padded_ent, packed_ent), (padded_v, packed_v)):
        torch.testing.assert_close(b[resp], a[resp], rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_an_unchecked_attention(upstream):
    from pipeline.errors import UserError

    pcfg, roles = _roles(upstream)
    roles.model.get_base_model().config._attn_implementation = "flex_attention"
    r = _rollout(2, len(roles.tokenizer))
    packed = memory.pack_episodes(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, torch.arange(2))
    with pytest.raises(UserError, match="ppo.pack_sequences: .*flex_attention.* set ppo.pack_sequences=false"):
        memory.packed_policy_logprobs(roles, packed, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Peak memory


def test_peak_rss_is_read_from_proc_status():
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t    1672 kB\nVmRSS:\t 1000 kB\n"
    assert memory.peak_rss_bytes(status) == 1672 * 1024
    assert memory.peak_rss_bytes("Name:\tpython\n") is None


def test_peak_memory_of_an_update_on_the_cpu_sees_a_new_allocation():
    kind = memory.reset_peak_memory(torch.device("cpu"))
    assert kind in ("rss_peak_this_update", "rss_peak_since_start")
    before = memory.peak_memory_gb(torch.device("cpu"))
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = memory.peak_memory_gb(torch.device("cpu"))
    assert after - before >= 0.06, (before, after)
    del block
    if kind == "rss_peak_this_update":  # the reset forgets the block: the peak falls back near the resident size
        memory.reset_peak_memory(torch.device("cpu"))
        assert memory.peak_memory_gb(torch.device("cpu")) < after - 0.03
