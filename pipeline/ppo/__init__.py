"""Stage 4: PPO of a LoRA policy against the reward model, every role on one copy of the base (see loop.py).

losses.py      advantages (GAE), whitening, clipped policy and value losses, KL estimators (pure maths)
control.py     the fixed and adaptive KL coefficient
roles.py       policy, reference, value and reward on one base: adapters, heads, their forward passes
rollout.py     prompts, sampling a rollout batch, its rewards, advantages and returns
optimise.py    the PPO epochs over a rollout batch: optimiser, mini-batches, gradient all-reduce
ptx.py         PPO-ptx: a pretraining loss on the web-text corpus
processes.py   what the processes of a distributed run share (sums, gathers)
checkpoint.py  saving and restoring everything an update depends on
evaluation.py  SFT against PPO on held-out prompts, and the over-optimisation rule
loop.py        the stage: `run`, one update after another
"""
