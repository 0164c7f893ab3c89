"""A transformers TrainerCallback shared by the benchmarks: wall and process CPU time at the end of every step."""

from __future__ import annotations

import time

import transformers


class StepClock(transformers.TrainerCallback):
    """Wall and process CPU time at the end of every optimiser step (time the steps after the first, warm-up out)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step_end(self, *_, **__):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
