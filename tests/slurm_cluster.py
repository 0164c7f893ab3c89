"""A private single-node Slurm cluster for tests: its own slurm.conf, state, spool and logs under a temporary folder.

`slurmctld` and `slurmd` (Debian's slurm-wlm, installed by `.ci/slurm-setup`) run as foreground daemons of this
process on 127.0.0.1 with a free port pair, a unique ClusterName, no authentication (auth/none, cred/none: tests run
as root on one machine) and one node of 2 CPUs. Client commands find the cluster through SLURM_CONF, which only the
environment built by `SlurmCluster.env` carries, so nothing here touches a system Slurm. Teardown cancels every job,
stops both daemons and kills whatever is left of the jobs (found by their SLURM_CONF), also when a test failed.

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401 (the fixture `slurm_cluster`)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODE_CPUS = 2
NODE_MEMORY_MB = 8192  # what the node advertises; datatrove's jobs ask for mem_per_cpu_gb per CPU
KILL_WAIT_S = 30  # seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or pre-empted
REQUEUE_DELAY_S = 5  # cred_expire: a requeued job waits this long before it may start again (Slurm default 120)

SLURM_CONF = """\
# A private test cluster (tests/slurm_cluster.py). Written for Slurm 22.05 (Debian 12's slurm-wlm).
ClusterName={cluster}
FirstJobId={first_job_id}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire={requeue_delay}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
KillWait={kill_wait}
MinJobAge=3600
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def free_port_pair() -> tuple[int, int]:
    """Two distinct TCP ports free on 127.0.0.1 right now (the kernel picks them)."""
    sockets = [socket.socket() for _ in range(2)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Job:
    """What `scontrol show job` says about one job."""

    job_id: str
    state: str
    restarts: int
    exit_code: str
    fields: dict[str, str] = field(repr=False, default_factory=dict)


@dataclass
class SlurmCluster:
    """A running private cluster; `env` is the environment for client commands and jobs (it carries SLURM_CONF)."""

    root: Path
    conf: Path
    cluster: str
    node: str
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def command(self, *args: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, squeue, scontrol, scancel, sbatch) against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit a batch job from `cwd` (the job's SLURM_SUBMIT_DIR); returns its id."""
        out = self.command("sbatch", "--parsable", *args, cwd=cwd, env=env or {}).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """`scontrol show job`: one record, or one per task of a job array."""
        records = []
        for line in self.command("scontrol", "show", "job", "-o", job_id).stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                records.append(Job(fields["JobId"], fields["JobState"], int(fields.get("Restarts", "0")),
                                   fields.get("ExitCode", ""), fields))  # fmt: skip
        return records

    def job(self, job_id: str) -> Job:
        return next(job for job in self.jobs(job_id) if job.job_id == job_id)

    def wait_for(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> Job:
        """Poll until the job is in one of `states`; a job that ends in another state fails the test."""
        deadline = time.time() + timeout
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if job.state in final:
                raise AssertionError(f"job {job_id} ended {job.state} (exit {job.exit_code}), not {sorted(states)}")
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {job.state} after {timeout:.0f} s, not {sorted(states)}")
            time.sleep(poll)

    def node_state(self) -> str:
        return self.command("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False).stdout.strip()

    def logs(self) -> str:
        """The daemons' log tails, for assertion messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.root / "log" / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # ----------------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start slurmctld and slurmd in the foreground (-D) as children of this process; wait for an idle node."""
        log = self.root / "log"
        for name, command in (
            ("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)]),
            ("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)]),
        ):
            out = open(log / f"{name}.out", "w")  # noqa: SIM115 (closed with the process group in stop())
            self.daemons.append(
                subprocess.Popen([shutil.which(command[0]) or command[0], *command[1:]], env=self.env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            )  # fmt: skip
            out.close()
        deadline = time.time() + timeout
        while self.node_state() != "idle":
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"the test Slurm cluster did not come up ({dead or 'timeout'}):\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, kill what is left of them, stop the daemons (also after a failed test)."""
        daemons = {proc.pid for proc in self.daemons}
        if self.daemons and self.daemons[0].poll() is None:
            self.command("scancel", "--user=root", check=False, timeout=20)  # nothing pending starts any more
        for pid in self.leftover_pids():
            if pid not in daemons:  # the jobs' processes and their slurmstepd
                _kill(pid)
        for proc in self.daemons:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=5)  # slurmctld can hang on SIGTERM while it still kills a job
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in self.leftover_pids():  # anything started meanwhile
            _kill(pid)

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster's jobs (slurmstepd and the job's own), known by SLURM_CONF in their environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def make_cluster(root: Path, base_env: dict[str, str] | None = None) -> SlurmCluster:
    """Write the configuration of a new private cluster under `root` (not started)."""
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "plugstack.conf").write_text("")
    ctld_port, slurmd_port = free_port_pair()
    cluster = f"rlhftest{uuid.uuid4().hex[:8]}"
    first_job_id = random.randrange(1000, 900_000)  # job logs named by id never meet a stale one of another cluster
    node = socket.gethostname().split(".")[0]  # the job's node list must resolve (the sbatch script connects to it)
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            cluster=cluster,
            node=node,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
            root=root,
            cpus=NODE_CPUS,
            memory=NODE_MEMORY_MB,
            kill_wait=KILL_WAIT_S,
            requeue_delay=REQUEUE_DELAY_S,
            first_job_id=first_job_id,
        )
    )
    env = {**(base_env if base_env is not None else os.environ), "SLURM_CONF": str(conf)}
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[key]  # a test run inside a real Slurm job must not leak that job into this cluster
    return SlurmCluster(root=root, conf=conf, cluster=cluster, node=node, env=env)


def require_slurm() -> None:
    missing = [name for name in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): run `bash .ci/slurm-setup`")


@pytest.fixture(scope="module", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A private single-node Slurm cluster for the tests of one module, stopped (with all its jobs) afterwards."""
    require_slurm()
    cluster = make_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
