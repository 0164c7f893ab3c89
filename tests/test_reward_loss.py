"""The reward stage's maths against hand-computed values: K-wise Bradley-Terry, tie-aware likelihoods, margin,
centring, tie tolerance, and the metric modules."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.rankings import parse_ranking, strict_pairs, tier_of
from pipeline.metrics import load_metric
from pipeline.modeling import cut_start, join_prompt_response
from pipeline.reward.evaluation import choose_tie_tolerance
from pipeline.reward.losses import (
    centering_penalty,
    pair_masks,
    ranking_loss,
    scatter_rewards,
    tie_nll,
    tie_parameter,
    win_nll,
)

LOG2, LOG3 = math.log(2), math.log(3)


def _tiers(*rankings, k=4):
    rows = [tier_of(parse_ranking(r, len(r.replace(">", "=").split("=")))) for r in rankings]
    return torch.tensor([row + [-1] * (k - len(row)) for row in rows])


def test_equal_scores_give_a_pair_loss_of_log_2():
    loss = ranking_loss(torch.tensor([[0.7, 0.7]]), _tiers("A > B", k=2))
    assert loss.item() == pytest.approx(LOG2)


def test_pair_masks_of_a_ranking_with_a_tie():
    better, tied = pair_masks(_tiers("C > B > A = D"))
    assert sorted(map(tuple, better[0].nonzero().tolist())) == sorted([(2, 1), (2, 0), (2, 3), (1, 0), (1, 3)])
    assert tied[0].nonzero().tolist() == [[0, 3]]


def test_kwise_loss_by_hand_for_c_b_a_d():
    # rewards A=0, B=1, C=2, D=0: pairs CB (d=1), CA (2), CD (2), BA (1), BD (1); A = D adds nothing
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326169, -log sigmoid(2) = log(1 + e^-2) = 0.12692801
    # mean = (3 * 0.31326169 + 2 * 0.12692801) / 5 = 0.23872822
    loss = ranking_loss(torch.tensor([[0.0, 1.0, 2.0, 0.0]]), _tiers("C > B > A = D"))
    assert loss.item() == pytest.approx(0.23872822, abs=1e-7)


def test_kwise_loss_equals_the_mean_of_pairwise_losses_computed_one_by_one():
    torch.manual_seed(0)
    rankings = ["C > B > A = D", "A > B > C > D", "B = C > A", "A > B"]
    rewards = torch.randn(4, 4)
    one_by_one = []
    for b, text in enumerate(rankings):
        k = len(text.replace(">", "=").split("="))
        pairs = strict_pairs(parse_ranking(text, k))
        losses = [-F.logsigmoid(rewards[b, i] - rewards[b, j]) for i, j in pairs]
        one_by_one.append(sum(losses) / len(losses))  # InstructGPT: 1 / (number of pairs) per prompt
    expected = sum(one_by_one) / len(one_by_one)  # then one prompt = one batch element
    assert ranking_loss(rewards, _tiers(*rankings)).item() == pytest.approx(expected.item(), abs=1e-6)


def test_tied_pairs_add_nothing_and_all_tied_prompts_are_left_out():
    rewards = torch.tensor([[3.0, -2.0], [0.5, 0.5]])
    loss = ranking_loss(rewards, _tiers("A = B", "A > B", k=2))
    assert loss.item() == pytest.approx(LOG2)  # only the second prompt counts
    everything_tied = ranking_loss(torch.tensor([[1.0, 2.0]], requires_grad=True), _tiers("A = B", k=2))
    assert everything_tied.item() == 0.0 and everything_tied.requires_grad


def test_margin_is_subtracted_from_the_reward_difference():
    # r_A - r_B = 1, margin 1: -log sigmoid(0) = log 2
    loss = ranking_loss(torch.tensor([[1.0, 0.0]]), _tiers("A > B", k=2), margin=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(LOG2)


def test_rao_kupper_by_hand():
    # tie_probability 1/3: theta = (1 + 1/3) / (1 - 1/3) = 2, nu = log 2
    nu = tie_parameter("rao_kupper", 1 / 3)
    assert nu == pytest.approx(LOG2)
    # equal rewards: P(win) = 1 / (1 + theta) = 1/3, P(tie) = (theta - 1) / (theta + 1) = 1/3
    zero = torch.tensor(0.0)
    assert win_nll(zero, "rao_kupper", nu).item() == pytest.approx(LOG3)
    assert tie_nll(zero, "rao_kupper", nu).item() == pytest.approx(LOG3)
    # pi_i = 2 pi_j (d = log 2): P(i > j) = 2 / (2 + 2) = 1/2, P(tie) = 3 * 2 / (4 * 5) = 0.3, P(j > i) = 1/5
    d = torch.tensor(LOG2)
    assert win_nll(d, "rao_kupper", nu).item() == pytest.approx(LOG2)
    assert tie_nll(d, "rao_kupper", nu).item() == pytest.approx(-math.log(0.3))
    assert win_nll(-d, "rao_kupper", nu).item() == pytest.approx(-math.log(0.2))


def test_davidson_by_hand():
    # tie_probability 1/3: nu = 2 (1/3) / (2/3) = 1; equal rewards: P(win) = P(tie) = 1 / (1 + 1 + 1)
    nu = tie_parameter("davidson", 1 / 3)
    assert nu == pytest.approx(1.0)
    zero = torch.tensor(0.0)
    assert win_nll(zero, "davidson", nu).item() == pytest.approx(LOG3)
    assert tie_nll(zero, "davidson", nu).item() == pytest.approx(LOG3)
    # pi_i = 4 pi_j (d = 2 log 2), sqrt(pi_i pi_j) = 2 pi_j: P(i > j) = 4/7, P(tie) = 2/7, P(j > i) = 1/7
    d = torch.tensor(2 * LOG2)
    assert win_nll(d, "davidson", nu).item() == pytest.approx(-math.log(4 / 7))
    assert tie_nll(d, "davidson", nu).item() == pytest.approx(-math.log(2 / 7))
    assert win_nll(-d, "davidson", nu).item() == pytest.approx(-math.log(1 / 7))


@pytest.mark.parametrize("tie_model", ["rao_kupper", "davidson"])
def test_tie_aware_loss_averages_wins_and_ties_of_a_prompt(tie_model):
    # A > B = C with rewards A = 2 log 2, B = C = 0: pairs AB, AC (wins, d = 2 log 2) and BC (tie, d = 0)
    rewards = torch.tensor([[2 * LOG2, 0.0, 0.0]])
    nu = tie_parameter(tie_model, 1 / 3)
    d = torch.tensor(2 * LOG2)
    expected = (2 * win_nll(d, tie_model, nu) + tie_nll(torch.tensor(0.0), tie_model, nu)) / 3
    loss = ranking_loss(rewards, _tiers("A > B = C", k=3), tie_model=tie_model)
    assert loss.item() == pytest.approx(expected.item())


def test_centering_penalty_and_scatter_by_hand():
    tiers = torch.tensor([[0, 1, -1], [1, 0, 0]])
    rewards = scatter_rewards(torch.tensor([1.0, -3.0, 2.0, 0.0, 1.0]), tiers)
    assert rewards.tolist() == [[1.0, -3.0, 0.0], [2.0, 0.0, 1.0]]
    # (1 + 9 + 4 + 0 + 1) / 5 = 3
    assert centering_penalty(rewards, tiers).item() == pytest.approx(3.0)


def test_tie_tolerance_maximises_macro_f1_on_validation_pairs():
    # strict pairs far apart, tied pairs close: any tolerance in [0.1, 2) separates them; the smallest is chosen
    differences = torch.tensor([2.0, -2.0, 3.0, -3.0, 0.1, -0.1, 0.05, -0.05], dtype=torch.double)
    labels = ["better", "worse", "better", "worse", "tie", "tie", "tie", "tie"]
    assert choose_tie_tolerance(differences, labels) == pytest.approx(0.1)
    # without ties in the labels, calling anything a tie only costs
    assert choose_tie_tolerance(torch.tensor([1.0, -1.0, 0.2, -0.2]), ["better", "worse"] * 2) == 0.0


def test_prompt_loses_its_start_then_the_response_its_end_but_keeps_eos():
    assert join_prompt_response([1, 2, 3, 4, 5], [6, 7, 8, 9], 6) == [3, 4, 5, 6, 7, 9]
    assert join_prompt_response([1, 2, 3, 4, 5, 6, 7, 8], [9, 10], 6) == [5, 6, 7, 8, 9, 10]
    assert join_prompt_response([1, 2], [3, 4], 6) == [1, 2, 3, 4]
    # a leading BOS survives the cut: the model never read a prompt without it
    assert join_prompt_response([1, 2, 3, 4, 5], [6, 7, 8, 9], 6, bos_id=1) == [1, 4, 5, 6, 7, 9]
    assert join_prompt_response([1, 2, 3, 4, 5], [6, 7, 8, 9], 6, bos_id=2) == [3, 4, 5, 6, 7, 9]  # not first
    assert cut_start([1, 2, 3, 4, 5], 3, bos_id=1) == [1, 4, 5] and cut_start([1, 2, 3], 3, bos_id=1) == [1, 2, 3]
    assert cut_start([1, 2, 3, 4, 5], 1, bos_id=1) == [5]  # no room for both: the end wins


# --------------------------------------------------------------------------------------------------------------
# The metric modules (local `evaluate` modules in pipeline/metrics/)


def test_metric_modules_by_hand():
    accuracy = load_metric("pairwise_accuracy").compute(
        chosen_rewards=[1.0, 0.2, 0.5], rejected_rewards=[0.0, 0.7, 0.5]
    )
    assert accuracy["accuracy"] == pytest.approx(0.5)  # right, wrong, an exact tie counts 1/2
    assert accuracy["mean_margin"] == pytest.approx((1.0 - 0.5 + 0.0) / 3)

    # C > B > A = D with rewards (0.1, 0.5, 0.9, 0.3): 5 concordant pairs, none discordant, 1 pair tied in the
    # ranking only: tau_b = 5 / sqrt(6 * 5)
    tau = load_metric("kendall_tau").compute(
        predictions=[[0.1, 0.5, 0.9, 0.3], [1.0, 1.0]], references=[[-2, -1, 0, -2], [0, 0]]
    )
    assert (
        tau["kendall_tau"] == pytest.approx(5 / math.sqrt(30)) and tau["prompts"] == 1
    )  # the all-tied one is left out

    judged = load_metric("pair_judgement").compute(
        reward_differences=[1.2, -0.1, 0.05, -0.5], references=["better", "worse", "tie", "tie"], tolerance=0.1
    )
    # predicted: better, tie, tie, worse
    assert judged["accuracy"] == pytest.approx(0.5)
    assert (judged["better_precision"], judged["better_recall"]) == (1.0, 1.0)
    assert (judged["worse_precision"], judged["worse_recall"], judged["worse_f1"]) == (0.0, 0.0, 0.0)
    assert (judged["tie_precision"], judged["tie_recall"]) == (0.5, 0.5)
    assert judged["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)

    summary = load_metric("reward_distribution").compute(rewards=[0.5, -1.0, 2.0])
    assert summary["mean"] == pytest.approx(0.5) and summary["std"] == pytest.approx(math.sqrt(1.5))
    assert (summary["min"], summary["max"], summary["p50"]) == (-1.0, 2.0, 0.5)
