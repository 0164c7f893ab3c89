"""The pipeline on a CUDA GPU: run a recipe end to end and print each stage's time, peak GPU memory and key metrics.

    python benchmarks/gpu_pipeline.py recipes/gpu.yaml            # the 125m model, bf16 pretraining, QLoRA after it
    python benchmarks/gpu_pipeline.py recipes/demo.yaml run_dir=runs/demo-gpu

The run is the real CLI (`python -m pipeline run RECIPE`, finished stages skipped as usual), in a child process;
afterwards every stage's stage.json gives its time, the peak GPU memory of the process that ran it (the driver
resets the peak before each stage) and the metrics `rlhf status` shows. It prints figures; it is not a test.
Recorded runs: benchmarks/results/gpu_pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.checkpoints import final_dir, is_finished, read_stage_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.driver import status_rows  # noqa: E402
from pipeline.stages import STAGES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for `rlhf run`")
    parser.add_argument("--from", dest="start", help="first stage to run (earlier ones must be finished)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_pipeline: no CUDA device visible (run it on a machine with an NVIDIA GPU)")
    device = torch.cuda.get_device_name(0)
    command = [sys.executable, "-m", "pipeline", "run", args.recipe, *args.overrides]
    if args.start:
        command += ["--from", args.start]
    print("$", " ".join(command), flush=True)
    started = time.time()
    code = subprocess.run(command, cwd=ROOT).returncode
    wall = time.time() - started

    cfg = load_config(args.recipe, args.overrides)
    figures = {
        "device": device,
        "torch": torch.__version__,
        "recipe": args.recipe,
        "overrides": args.overrides,
        "exit_code": code,
        "wall_seconds": round(wall, 1),
        "stages": {},
    }
    print(f"\n{device}, torch {torch.__version__}; `pipeline run` exit code {code}, wall time {wall:.0f} s")
    print(f"{'stage':9s} {'state':12s} {'seconds':>8s} {'peak GPU MiB':>13s}  metrics")
    for row in status_rows(cfg):
        stage = row["stage"]
        final = final_dir(cfg, stage)
        hardware = read_stage_json(final).get("hardware", {}) if is_finished(final) else {}
        peak = hardware.get("cuda_peak_memory_mib")
        seconds = row.get("seconds")
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("metrics", {}).items()
        )
        print(
            f"{stage:9s} {row['state'][:12]:12s} {seconds if seconds is not None else '-':>8} {peak if peak is not None else '-':>13}  {metrics}"
        )
        figures["stages"][stage] = {
            "state": row["state"],
            "seconds": seconds,
            "cuda_peak_memory_mib": peak,
            "metrics": row.get("metrics", {}),
        }
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    if code != 0 or any(figures["stages"][s]["state"] != "finished" for s in STAGES):
        sys.exit(1)


if __name__ == "__main__":
    main()
