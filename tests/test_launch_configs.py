"""accelerate_configs/*.yaml read by accelerate's own loader and launch logic, and the Slurm script with a stand-in srun.

What is checked offline: every config loads with accelerate's `load_config_from_file` (unknown top-level keys fail
there); every nested fsdp/deepspeed key is an option `accelerate launch` knows; `_validate_launch_command` picks the
intended launcher and process counts; the environment `accelerate launch` would hand the processes builds accelerate's
FSDP / DeepSpeed plugin. Not checked here: running under DeepSpeed (not installed: `pip install deepspeed` on a GPU
machine) or on GPUs at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
SBATCH = CONFIGS / "slurm" / "rlhf.sbatch"

# config file -> what accelerate must make of it
EXPECTED = {
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1, "launcher": "simple"},
    "multi_gpu.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 8,
        "num_machines": 1,
        "launcher": "multi_gpu",
    },
    "fsdp2.yaml": {"distributed_type": "FSDP", "num_processes": 8, "num_machines": 1, "launcher": "fsdp"},
    "deepspeed_zero2.yaml": {
        "distributed_type": "DEEPSPEED",
        "num_processes": 8,
        "num_machines": 1,
        "launcher": "deepspeed",
    },
    "deepspeed_zero3.yaml": {
        "distributed_type": "DEEPSPEED",
        "num_processes": 8,
        "num_machines": 1,
        "launcher": "deepspeed",
    },
    "multi_node.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 16,
        "num_machines": 2,
        "launcher": "multi_gpu",
    },
    "cpu_ddp.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 2, "num_machines": 1, "launcher": "multi_gpu"},
}


def _resolve(config: Path, *flags: str):
    """What `accelerate launch --config_file config [flags] -m pipeline sft r.yaml` decides, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), *flags, "-m", "pipeline", "sft", "r.yaml"]
    )
    return _validate_launch_command(args)


def test_every_config_is_listed():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader_and_launch_options(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    expected = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == expected["distributed_type"]
    assert (config.num_processes, config.num_machines) == (expected["num_processes"], expected["num_machines"])
    # Nested keys are copied onto launch arguments without a check in accelerate: a typo would be ignored silently.
    known = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config]
    nested += list(config.deepspeed_config)
    assert [k for k in nested if k not in known] == []

    args, _, _ = _resolve(CONFIGS / name)
    launcher = (
        "deepspeed" if args.use_deepspeed else "fsdp" if args.use_fsdp else "multi_gpu" if args.multi_gpu else "simple"
    )
    assert launcher == expected["launcher"]
    assert args.num_processes == expected["num_processes"]


def test_fsdp2_config_builds_an_fsdp2_plugin():
    from accelerate.commands.launch import prepare_multi_gpu_env
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    args, _, _ = _resolve(CONFIGS / "fsdp2.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_VERSION"] == "2" and env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # one ordinary adapter file at save time
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.cpu_ram_efficient_loading is True


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_builds_a_deepspeed_plugin(name, stage):
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _resolve(CONFIGS / name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `accelerate launch` does
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one machine, "standard" launcher: torchrun, not the deepspeed/pdsh launcher
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    # ZeRO-3 must gather the sharded weights when saving, or PEFT writes an adapter of empty tensors.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert plugin.zero3_init_flag is (stage == 3)
    assert "gradient_accumulation_steps" not in defaults.deepspeed_config  # the recipe decides it


def test_multi_node_placeholders_are_overridden_by_the_command_line():
    from accelerate.commands.launch import prepare_multi_gpu_env

    args, _, _ = _resolve(CONFIGS / "multi_node.yaml")
    assert args.main_process_ip == "main-process-ip.invalid" and args.machine_rank == 0

    flags = ["--machine_rank", "2", "--main_process_ip", "10.0.0.7", "--main_process_port", "29611"]
    flags += ["--num_machines", "4", "--num_processes", "32"]
    args, _, _ = _resolve(CONFIGS / "multi_node.yaml", *flags)
    prepare_multi_gpu_env(args)
    # torchrun's arguments (accelerate ignores the file's same_network, so the static rendezvous endpoint is used)
    assert (args.node_rank, args.rdzv_endpoint, args.rdzv_backend) == (2, "10.0.0.7:29611", "static")
    assert (args.nnodes, args.nproc_per_node) == ("4", "8")


# --------------------------------------------------------------------------------------------------------------
# The Slurm script, with stand-in srun / scancel / scontrol / accelerate on PATH. They act as Slurm 22.05 does
# (tests/test_slurm.py runs the script on a real single-node cluster): srun answers SIGTERM by SIGKILLing its tasks,
# and `scancel --signal=SIG JOB` delivers SIG to every process of the job's steps, not to the batch shell.

FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun: run the command once per node, each task in a process group of its own (Slurm's step), with that
# node's SLURM_NODEID; on SIGTERM kill the tasks (a real srun forces the step's termination); exit with the highest
# task status.
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i setsid "$@" &
    pids+=($!)
done
printf '%s\n' "${pids[@]}" > "$FAKE_DIR/step.pgids"
trap 'echo "srun got TERM: SIGKILL to the step" >> "$FAKE_LOG"; for p in "${pids[@]}"; do kill -KILL -- "-$p"; done' TERM
rc=0
for p in "${pids[@]}"; do
    while true; do wait "$p"; s=$?; kill -0 "$p" 2>/dev/null || break; done
    (( s > rc )) && rc=$s
done
exit $rc
"""

FAKE_SCANCEL = r"""#!/bin/bash
# Stand-in for `scancel --signal=SIG JOB`: SIG to every process of the step (not to the batch shell).
echo "scancel $*" >> "$FAKE_LOG"
sig="${1#--signal=}"
while read -r pgid; do kill -"$sig" -- "-$pgid" 2>/dev/null; done < "$FAKE_DIR/step.pgids"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-07\ngpu-node-08\n'; fi
"""

FAKE_ACCELERATE = r"""#!/bin/bash
# Stand-in for accelerate: record the arguments (one per line), then act as FAKE_MODE says.
printf '%s\n' "$@" > "$FAKE_DIR/accelerate.$SLURM_NODEID"
case "$FAKE_MODE" in
    record) exit 0 ;;
    preempted) exit 143 ;;
    fail) exit 1 ;;
    wait)
        trap 'echo "node $SLURM_NODEID got TERM" >> "$FAKE_LOG"; exit 143' TERM
        echo "node $SLURM_NODEID started" >> "$FAKE_LOG"
        while true; do sleep 0.05; done ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": FAKE_SRUN, "scancel": FAKE_SCANCEL, "scontrol": FAKE_SCONTROL, "accelerate": FAKE_ACCELERATE}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(log),
        "FAKE_DIR": str(tmp_path),
        "FAKE_MODE": "record",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_RESTART_COUNT": "0",
    }
    return {"env": env, "log": log, "dir": tmp_path}


def _accelerate_args(slurm, node: int) -> list[str]:
    return (slurm["dir"] / f"accelerate.{node}").read_text().splitlines()


def test_slurm_script_is_valid_bash_with_requeue_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives
    assert "#SBATCH --signal=B:USR1@300" in directives  # USR1 to the batch shell 5 minutes before the limit
    assert "#SBATCH --ntasks-per-node=1" in directives  # one accelerate launcher per node
    text = SBATCH.read_text()
    assert "trap 'on_signal USR1' USR1" in text and "trap 'on_signal TERM' TERM" in text


def test_slurm_script_builds_one_accelerate_launch_per_node(slurm):
    override = "sft.system_prompt=Be brief, please"  # spaces survive the trip through srun and bash -c
    proc = subprocess.run(
        ["bash", str(SBATCH), "run", "recipes/demo.yaml", override],
        env=slurm["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    for node in (0, 1):
        assert _accelerate_args(slurm, node) == [
            "launch",
            "--machine_rank",
            str(node),
            "--config_file",
            "accelerate_configs/multi_node.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "8",  # 2 nodes x 4 GPUs
            "--main_process_ip",
            "gpu-node-07",
            "--main_process_port",
            "29742",  # 29500 + 4242 mod 1000
            "-m",
            "pipeline",
            "run",
            "recipes/demo.yaml",
            override,
        ]
    log = slurm["log"].read_text()
    assert "scontrol show hostnames gpu-node-[07-08]" in log
    assert "srun --ntasks-per-node=1 --ntasks=2 --kill-on-bad-exit=1" in log
    assert "requeue" not in log


def test_slurm_script_reads_gpu_count_and_config_from_environment(slurm):
    env = {**slurm["env"], "SLURM_GPUS_PER_NODE": "h100:8", "ACCELERATE_CONFIG": "accelerate_configs/fsdp2.yaml"}
    del env["SLURM_GPUS_ON_NODE"]
    proc = subprocess.run(["bash", str(SBATCH), "sft", "recipes/demo.yaml"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = _accelerate_args(slurm, 1)
    assert args[args.index("--num_processes") + 1] == "16"
    assert args[args.index("--config_file") + 1] == "accelerate_configs/fsdp2.yaml"
    assert args[-3:] == ["pipeline", "sft", "recipes/demo.yaml"]

    one_gpu = {**slurm["env"], "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1"}
    proc = subprocess.run(
        ["bash", str(SBATCH), "ppo", "recipes/demo.yaml"], env=one_gpu, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    args = _accelerate_args(slurm, 0)
    assert args[args.index("--config_file") + 1] == "accelerate_configs/single_gpu.yaml"  # DDP needs 2 processes
    assert args[args.index("--num_processes") + 1] == "1"

    missing = {**env, "ACCELERATE_CONFIG": "accelerate_configs/nope.yaml"}
    proc = subprocess.run(
        ["bash", str(SBATCH), "sft", "r.yaml"], env=missing, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "accelerate config not found" in proc.stderr


def _start_and_wait_for_ranks(slurm, env):
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "run", "recipes/demo.yaml"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 20
    while slurm["log"].read_text().count("started") < 2:
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the stand-in ranks never started: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("restarts,requeued", [(0, True), (20, False)])
def test_slurm_script_on_usr1_has_slurm_signal_every_rank_then_requeues(slurm, restarts, requeued):
    """--signal=B:USR1@300 (the time-limit warning) reaches the batch shell only; the script has Slurm pass SIGTERM
    to every process of the step (never to srun, which would SIGKILL the step), waits, then requeues the job."""
    env = {**slurm["env"], "FAKE_MODE": "wait", "SLURM_RESTART_COUNT": str(restarts)}
    proc = _start_and_wait_for_ranks(slurm, env)
    try:
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = slurm["log"].read_text()
    assert proc.returncode == 0, err
    assert "scancel --signal=TERM 4242" in log and "srun got TERM" not in log
    assert "node 0 got TERM" in log and "node 1 got TERM" in log  # every rank was asked to checkpoint
    assert ("scontrol requeue 4242" in log) is requeued
    assert log.index("node 1 got TERM") < log.index("scontrol requeue") if requeued else True  # after the ranks stop


def test_slurm_script_on_sigterm_waits_for_the_ranks_and_never_requeues(slurm):
    """SIGTERM comes from Slurm itself (pre-emption, requeue, scancel, time limit), which signals every process of the
    job: the script waits for the ranks to save, and leaves requeueing to Slurm, or `scancel` could not end the job."""
    env = {**slurm["env"], "FAKE_MODE": "wait"}
    proc = _start_and_wait_for_ranks(slurm, env)
    try:
        for pgid in (slurm["dir"] / "step.pgids").read_text().split():  # what Slurm does to the step
            os.killpg(int(pgid), signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # and to the batch shell
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = slurm["log"].read_text()
    assert proc.returncode == 143, err
    assert "node 0 got TERM" in log and "node 1 got TERM" in log
    assert "srun got TERM" not in log and "scancel" not in log and "requeue" not in log


@pytest.mark.parametrize("mode,rc,requeued", [("preempted", 0, True), ("fail", 1, False)])
def test_slurm_script_exit_status_of_the_ranks(slurm, mode, rc, requeued):
    env = {**slurm["env"], "FAKE_MODE": mode}
    proc = subprocess.run(["bash", str(SBATCH), "run", "recipes/demo.yaml"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == rc
    assert ("scontrol requeue 4242" in slurm["log"].read_text()) is requeued
