"""Judges: what scores one response to one prompt where a stage's evaluation needs more than the reward model.

A judge never trains anything; it evaluates (SFT's judged answers, PPO's gold score, win rate against SFT, insult
rate and over-optimisation check). The recipe names one with `judge:`; today that is `demo` (the demo world's gold
rule, pipeline/demo/gold.py). Without one, those evaluations are skipped and `stage.json` says so in one line.
"""

from __future__ import annotations

from typing import Protocol

from pipeline import demo
from pipeline.config import PipelineConfig

# What a stage writes into stage.json in place of the judged figures when the recipe names no judge.
NO_JUDGE = "no judge in the recipe (judge: null): gold score, win rate and insult rate were not measured"


class Verdict(Protocol):
    """One judgement: a score (higher is better), what the judge took the prompt for, and the faults it found."""

    @property
    def score(self) -> float: ...

    @property
    def kind(self) -> str: ...  # e.g. "fact", "adversarial", "other"

    @property
    def faults(self) -> frozenset[str]: ...  # e.g. {"wrong", "rude", "insulting", "impolite", "dispreferred"}


class Judge(Protocol):
    """Scores one response to one prompt (the prompt as the user's last turn, in text)."""

    def judge(self, prompt: str, response: str) -> Verdict: ...


def load_judge(cfg: PipelineConfig) -> Judge | None:
    """The recipe's judge, or None when it names none."""
    if cfg.judge == demo.DEMO:
        return demo.judge(cfg)
    return None
