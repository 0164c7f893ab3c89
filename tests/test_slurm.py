"""The Slurm path for real: `accelerate_configs/slurm/rlhf.sbatch` and `webtext.executor=slurm` on a private single-node
Slurm cluster (tests/slurm_cluster.py: slurmctld + slurmd on 127.0.0.1, 2 CPUs, no GPU).

- `sbatch rlhf.sbatch run RECIPE` finishes every stage; the log and the run directory are where the README says,
  and the results are bit-identical to a local `rlhf run`;
- a job pre-empted mid-stage (`scontrol requeue`, `scancel --batch --signal=USR1` as the time-limit warning does, or
  `scancel --signal=USR1` to the step) saves a checkpoint, is requeued, resumes from it and ends with the same
  weights as an uninterrupted job; a cancelled one saves and stays cancelled;
- the web-text stage with the Slurm executor runs as job arrays and writes the same parquet as the local executor;
- a 2-process job runs pretraining under `accelerate launch` with world size 2 over gloo.

Slow (4 to 7 minutes on 2 cores) and opt-in; Slurm comes from `bash .ci/slurm-setup`:

    bash .ci/slurm-setup && .venv/bin/python -m pytest -m slow tests/test_slurm.py -x -q -s   # -s shows the job ids
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import REQUEUE_DELAY_S, SlurmCluster, slurm_cluster_fixture  # noqa: F401 (the fixture `slurm_cluster`)
from test_pipeline import TINY

from pipeline.checkpoints import CHECKPOINT_DONE

pytestmark = pytest.mark.slow

# The web-text stage's name: its CLI command (`rlhf webtext`), its recipe section (`webtext:`), its run-dir folder
# (run_dir/webtext/) and its name in driver.json.
WEBTEXT = "webtext"

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "accelerate_configs" / "slurm" / "rlhf.sbatch"
STAGES = (WEBTEXT, "pretrain", "sft", "reward", "ppo")
# What a CPU-only cluster needs on the command line: the script's directives ask for 2 nodes of 8 GPUs and 32 CPUs.
CPU_JOB = ["--nodes=1", "--gpus-per-node=0"]
LONG_PRETRAIN = ["pretrain.max_steps=2000", "pretrain.save_steps=100000", "--until", "pretrain"]  # 10-30 s of steps
JOB_TIMEOUT_S = 600


def _write_recipe(path: Path, run_dir: str) -> Path:
    path.write_text(
        f"# tiny pipeline for the Slurm tests\nrun_dir: {run_dir}\nseed: 7\njudge: demo\n{WEBTEXT}:\n  input: demo\n"
        "sft:\n  dataset: demo\nreward:\n  dataset: demo\nppo:\n  dataset: demo\n  eval_dataset: demo\n"
    )
    return path


def _job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What a user's shell would pass to sbatch: the cluster's SLURM_CONF, offline Hub, and no active virtualenv
    (the script must find the repository's .venv itself; another venv running the tests is named by RLHF_VENV)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in cluster.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TQDM_DISABLE="1")  # fmt: skip
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["RLHF_VENV"] = sys.prefix
    return {**env, **extra}


def _submit(cluster: SlurmCluster, label: str, *args: str, env: dict[str, str] | None = None) -> str:
    job_id = cluster.sbatch(*args, cwd=REPO, env=env or _job_env(cluster))
    print(f"\n[slurm] {label}: job {job_id}: sbatch {' '.join(a if len(a) < 60 else '...' for a in args[:12])} ...")
    return job_id


def _finish(cluster: SlurmCluster, job_id: str, log: Path, restarts: int = 0) -> str:
    """Wait for the job to complete; check its exit code and restarts; return its log."""
    try:
        job = cluster.wait_for(job_id, {"COMPLETED"}, timeout=JOB_TIMEOUT_S)
    except AssertionError as exc:
        text = log.read_text(errors="replace") if log.is_file() else "(no log)"
        raise AssertionError(f"{exc}\n--- job log {log}:\n{text[-6000:]}\n{cluster.logs()}") from None
    assert job.exit_code == "0:0" and job.restarts == restarts, job
    return log.read_text()


def _driver_runs(run_dir: Path) -> list[dict[str, str]]:
    """Stage -> action of every recorded driver run, oldest first."""
    history = json.loads((run_dir / "driver.json").read_text())
    return [{stage: info["action"] for stage, info in run["stages"].items()} for run in history]


def _stage_json(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "final" / "stage.json").read_text())


def _assert_same_weights(one: Path, two: Path) -> int:
    """torch.equal on every tensor of every safetensors file under two final/ dirs; returns the tensors compared."""
    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    compared = 0
    for name in files:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert different == [], f"{name}: {different}"
        compared += len(a)
    return compared


def _local_rlhf(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _job_env(cluster).items() if k != "SLURM_CONF"}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # the local executor never needs Slurm
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# --------------------------------------------------------------------------------------------------------------


def test_sbatch_run_finishes_every_stage_with_log_and_run_dir_where_readme_says(slurm_cluster, tmp_path):
    """README: submit from the repository root; the log is rlhf-<job id>.out there and a relative run_dir is under it."""
    run_dir = tmp_path / "run"
    relative = os.path.relpath(run_dir, REPO)  # resolves to run_dir only from the repository root
    recipe = _write_recipe(tmp_path / "recipe.yaml", relative)
    job_id = _submit(slurm_cluster, "run every stage", *CPU_JOB, "--cpus-per-task=1", str(SBATCH), "run",
                     str(recipe), *TINY)  # fmt: skip
    log = REPO / f"rlhf-{job_id}.out"
    try:
        text = _finish(slurm_cluster, job_id, log)
    finally:
        if log.is_file():
            (tmp_path / log.name).write_bytes(log.read_bytes())
            log.unlink()  # keep the checkout clean
    assert f"[rlhf.sbatch] job {job_id} (restart 0): 1 node(s) x 1 process(es)" in text
    venv = REPO / ".venv" if "RLHF_VENV" not in _job_env(slurm_cluster) else Path(sys.prefix)
    assert f"config accelerate_configs/cpu_ddp.yaml; {venv}/bin/accelerate;" in text  # found without activation
    assert f"report: {relative}/report/index.html" in text
    assert _driver_runs(run_dir) == [dict.fromkeys(STAGES, "ran")]
    for stage in STAGES:
        record = _stage_json(run_dir, stage)
        assert record["stage"] == stage
        if stage != WEBTEXT:
            assert record["hardware"]["world_size"] == 1, stage

    # The job's results are the local run's, bit for bit (the GPU configs' bf16 would have autocast on the CPU).
    local = tmp_path / "local"
    _local_rlhf(slurm_cluster, "run", str(_write_recipe(tmp_path / "local.yaml", str(local))), *TINY)
    compared = {
        stage: _assert_same_weights(run_dir / stage / "final", local / stage / "final") for stage in STAGES[1:]
    }
    print(f"[slurm] job {job_id}: weights equal to the local run's ({compared} tensors per stage)")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory) -> Path:
    """The long pretraining of the pre-emption tests, as one job that nothing interrupts; returns its run dir."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    recipe = _write_recipe(tmp_path / "recipe.yaml", str(tmp_path / "run"))
    log = tmp_path / "job.out"
    job_id = _submit(slurm_cluster, "uninterrupted pretraining", *CPU_JOB, "--cpus-per-task=1", f"--output={log}",
                     str(SBATCH), "run", str(recipe), *TINY, *LONG_PRETRAIN)  # fmt: skip
    _finish(slurm_cluster, job_id, log)
    assert _driver_runs(tmp_path / "run") == [{WEBTEXT: "ran", "pretrain": "ran"}]
    return tmp_path / "run"


PREEMPTIONS = {
    # how, the command (with the job id appended), what the script logs
    "scontrol_requeue": (["scontrol", "requeue"], "got SIGTERM: Slurm is stopping the job"),  # = a pre-emption
    "usr1_to_batch_shell": (["scancel", "--batch", "--signal=USR1"], "got SIGUSR1"),  # = the time-limit warning
    "usr1_to_step": (["scancel", "--signal=USR1"], "received SIGUSR1"),
}


@pytest.mark.parametrize("how", list(PREEMPTIONS))
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_cluster, uninterrupted, tmp_path,
                                                                            how):  # fmt: skip
    command, logged = PREEMPTIONS[how]
    run_dir = tmp_path / "run"
    pretrain = run_dir / "pretrain"
    recipe = _write_recipe(tmp_path / "recipe.yaml", str(run_dir))
    log = tmp_path / "job.out"
    job_id = _submit(slurm_cluster, f"pre-empted by {' '.join(command)}", *CPU_JOB, "--cpus-per-task=1",
                     f"--output={log}", str(SBATCH), "run", str(recipe), *TINY, *LONG_PRETRAIN)  # fmt: skip
    deadline = time.time() + JOB_TIMEOUT_S
    while not (pretrain / "metrics.jsonl").is_file():  # training has started (a line every 2 steps)
        job = slurm_cluster.job(job_id)
        assert job.state in ("PENDING", "RUNNING") and time.time() < deadline, (job, log.read_text()[-3000:])
        time.sleep(0.1)
    slurm_cluster.command(*command, job_id)
    text = _finish(slurm_cluster, job_id, log, restarts=1)

    assert logged in text
    assert text.count("saving a checkpoint and stopping") >= 1 and "stopped: pre-empted" in text
    assert f"[rlhf.sbatch] job {job_id} (restart 1)" in text
    resumed = re.findall(rf"resuming from {re.escape(str(pretrain))}/checkpoint-(\d+)", text)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 2000, resumed  # the checkpoint saved on the signal
    assert _driver_runs(run_dir)[-1] == {WEBTEXT: "skipped", "pretrain": "resumed"}
    record = _stage_json(run_dir, "pretrain")["metrics"]
    assert record["train_steps"] == 2000 and record["resumed_from_step"] == int(resumed[0])
    compared = _assert_same_weights(uninterrupted / "pretrain" / "final", pretrain / "final")
    print(f"[slurm] job {job_id}: saved checkpoint-{resumed[0]}, requeued, resumed; {compared} tensors equal")


def test_cancelled_job_saves_a_checkpoint_and_is_not_requeued(slurm_cluster, tmp_path):
    """`scancel` sends SIGTERM as a pre-emption does, but the job must end: the script never requeues after SIGTERM."""
    pretrain = tmp_path / "run" / "pretrain"
    recipe = _write_recipe(tmp_path / "recipe.yaml", str(tmp_path / "run"))
    log = tmp_path / "job.out"
    job_id = _submit(slurm_cluster, "cancelled", *CPU_JOB, "--cpus-per-task=1", f"--output={log}", str(SBATCH), "run",
                     str(recipe), *TINY, *LONG_PRETRAIN)  # fmt: skip
    deadline = time.time() + JOB_TIMEOUT_S
    while not (pretrain / "metrics.jsonl").is_file():
        assert slurm_cluster.job(job_id).state in ("PENDING", "RUNNING") and time.time() < deadline
        time.sleep(0.1)
    slurm_cluster.command("scancel", job_id)
    slurm_cluster.wait_for(job_id, {"CANCELLED"}, timeout=120)
    while "[rlhf.sbatch] the ranks finished" not in log.read_text():  # the batch shell is done too
        assert time.time() < deadline
        time.sleep(0.5)
    time.sleep(REQUEUE_DELAY_S + 5)  # a requeue would show by now
    job = slurm_cluster.job(job_id)
    assert (job.state, job.restarts) == ("CANCELLED", 0), log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped: pre-empted" in text and "requeueing" not in text
    saved = re.search(rf"newest complete checkpoint is {re.escape(str(pretrain))}/checkpoint-(\d+)", text)
    assert saved and (pretrain / f"checkpoint-{saved.group(1)}" / CHECKPOINT_DONE).is_file(), text[-3000:]
    assert not (pretrain / "final").exists()
    print(f"[slurm] job {job_id}: cancelled at step {saved.group(1)}, checkpoint saved, not requeued")


def test_webtext_stage_on_the_slurm_executor_runs_job_arrays_and_matches_the_local_executor(slurm_cluster, tmp_path):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    overrides = [f"{WEBTEXT}.executor=slurm", f"{WEBTEXT}.slurm_partition=test"]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", WEBTEXT, str(_write_recipe(tmp_path / "slurm.yaml", str(on_slurm))),
         *TINY, *overrides],
        cwd=REPO, env=_job_env(slurm_cluster), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:] + slurm_cluster.logs()
    waited = re.search(r"waiting for Slurm jobs ([\d, ]+)", result.stderr)
    assert waited, result.stderr[-3000:]
    job_ids = waited.group(1).split(", ")
    passes = {}
    for job_id in job_ids:
        tasks = slurm_cluster.jobs(job_id)
        assert {t.fields["ArrayJobId"] for t in tasks} == {job_id}  # every pass is one job array
        assert {t.state for t in tasks} == {"COMPLETED"}
        passes[tasks[0].fields["JobName"]] = sorted(int(t.fields["ArrayTaskId"]) for t in tasks)
    print(f"\n[slurm] {WEBTEXT} stage on the Slurm executor: job arrays {', '.join(job_ids)}: {passes}")
    assert next(tasks for name, tasks in passes.items() if name.endswith("-filter")) == [0, 1, 2, 3]  # 4 shards
    assert len(passes) == len(job_ids) >= 4

    _local_rlhf(slurm_cluster, WEBTEXT, str(_write_recipe(tmp_path / "local.yaml", str(local))), *TINY)
    import pyarrow.parquet as pq

    one, two = on_slurm / WEBTEXT / "final", local / WEBTEXT / "final"
    files = sorted(p.relative_to(one) for p in one.rglob("*.parquet"))
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.parquet"))
    assert {f.parts[0] for f in files} == {"train", "validation"}
    rows = 0
    for name in files:
        a, b = pq.read_table(one / name), pq.read_table(two / name)
        assert a.equals(b), name  # the same documents (text, id, url) in the same order, shard by shard
        rows += a.num_rows
    metrics = _stage_json(on_slurm, WEBTEXT)["metrics"]
    assert rows == metrics["documents_kept"] == _stage_json(local, WEBTEXT)["metrics"]["documents_kept"] > 0
    print(f"[slurm] {len(files)} parquet files, {rows} documents, equal to the local executor's")


def test_two_process_job_runs_every_stage_with_world_size_2_over_gloo(slurm_cluster, tmp_path):
    """One `run` job of 2 processes: the first runs the web-text stage while the other waits for it, then both train
    pretraining as DDP ranks over gloo."""
    run_dir = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "recipe.yaml", str(run_dir))
    env = _job_env(slurm_cluster, PROCESSES_PER_NODE="2")
    log = tmp_path / "ddp.out"
    job = _submit(slurm_cluster, "run with 2 processes", *CPU_JOB, "--cpus-per-task=2", f"--output={log}",
                  str(SBATCH), "run", str(recipe), *TINY, "--until", "pretrain", env=env)  # fmt: skip
    text = _finish(slurm_cluster, job, log)
    assert f"[rlhf.sbatch] job {job} (restart 0): 1 node(s) x 2 process(es)" in text
    assert "config accelerate_configs/cpu_ddp.yaml" in text
    assert _driver_runs(run_dir) == [{WEBTEXT: "ran", "pretrain": "ran"}]
    assert _stage_json(run_dir, WEBTEXT)["hardware"]["world_size"] == 2  # run by one of the two, once
    record = _stage_json(run_dir, "pretrain")
    assert record["hardware"]["world_size"] == record["metrics"]["world_size"] == 2
    print(f"[slurm] job {job}: web text once, then pretraining with world_size {record['hardware']['world_size']}")
