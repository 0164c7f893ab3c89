"""Stage 3: a reward model from K-wise rankings with ties (see stage.py).

losses.py      the K-wise ranking loss, tie likelihoods, reward centring (pure maths)
data.py        rankings collected or read, split by prompt, encoded and batched
evaluation.py  held-out accuracy, tie judgement, Kendall's tau, baselines, reward_stats.json
stage.py       the Trainer with the K-wise loss, and `run`
"""
