"""A real one-node SLURM cluster (Debian's slurm-wlm and munge) in a scratch folder, for the launcher tests.

munged, slurmctld and slurmd run as this (root) user with every file under one folder and free loopback
ports, so the machine's own /etc/slurm and /etc/munge are never read or changed. The node offers
`FAKE_GPUS` GPUs as generic resources backed by empty files: SLURM then hands tasks the environment of a
GPU cluster (CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS, ...), while JAX trains on CPU devices.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
FAKE_GPUS = 4


def missing_programs() -> list[str]:
    """The programs of Debian's slurm-wlm and munge packages that this machine lacks."""
    return [name for name in (*DAEMONS, "sbatch", "srun", "squeue", "scancel") if shutil.which(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


class OneNodeSlurm:
    """munged + slurmctld + slurmd under `root`; `env` is what sbatch, srun, squeue and scancel need."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pids: dict[str, int] = {}

    def start(self, timeout: float = 60) -> OneNodeSlurm:
        for folder in ("state", "spool", "gpus"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_config()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
            self._remember_pid(daemon)
        self._wait_until_idle(timeout)
        return self

    def _remember_pid(self, daemon: str, timeout: float = 30) -> None:
        pid_file = self.root / f"{daemon}.pid"
        deadline = time.monotonic() + timeout
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon} did not start: see {self.root / daemon}.log")
            time.sleep(0.1)
        self._pids[daemon] = int(pid_file.read_text().split()[0])

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        paths = {
            "key-file": key,
            "socket": self.root / "munge.socket",
            "pid-file": self.root / "munged.pid",
            "log-file": self.root / "munged.log",
            "seed-file": self.root / "munged.seed",
        }
        subprocess.run(
            ["munged", *(f"--{name}={path}" for name, path in paths.items()), "--force"],
            check=True,
            capture_output=True,
        )
        self._remember_pid("munged")

    def _write_config(self) -> None:
        # Jobs start at a random id: JAX derives its coordinator port from the job id, and another
        # such cluster on this machine would otherwise number its jobs alike.
        controller_port, node_port = _free_ports(2)
        root = self.root
        fake_gpus = [root / "gpus" / f"nvidia{index}" for index in range(FAKE_GPUS)]
        for device in fake_gpus:  # SLURM wants character devices; these are /dev/null's (1, 3)
            if not device.exists():
                os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        (root / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"Name=gpu File={device}\n" for device in fake_gpus)
        )
        self.conf.write_text(
            f"""\
ClusterName=alexnet-test
FirstJobId={random.randrange(1, 4000)}
SlurmctldHost={self.node}
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={self.node} CPUs={os.cpu_count()} RealMemory=16000 Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        )

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.run("sinfo", "--noheader", "--format=%t", check=False)
            if state.returncode == 0 and state.stdout.strip() in ("idle", "mix", "alloc"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SLURM node is not up after {timeout} s: {state.stdout}{state.stderr}")
            time.sleep(0.5)

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, srun, squeue, scancel, ...) against this cluster."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(command, check=check, capture_output=True, text=True, **kwargs)

    def job_state(self, job_id: str) -> str | None:
        """PENDING, RUNNING, ...; None once the job has left the queue."""
        listed = self.run("squeue", "--noheader", "--format=%T", f"--jobs={job_id}", check=False)
        return listed.stdout.strip() or None if listed.returncode == 0 else None

    def stop(self, timeout: float = 60) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged, in that order (each needs the next)."""
        if "slurmctld" in self._pids:
            self.run("scancel", f"--user={os.getuid()}", check=False)
            deadline = time.monotonic() + timeout
            while self.run("squeue", "--noheader", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self._pids.pop(daemon, None)
            if pid is not None:
                _terminate(pid, timeout)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` s (a daemon is not our child: poll /proc)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            return
