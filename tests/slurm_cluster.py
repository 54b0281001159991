"""A real SLURM cluster on loopback for tests: munged, slurmctld and two slurmd daemons (fake nodes n1, n2).

Debian's `slurmctld slurmd slurm-client munge` packages, run as root without cgroups or accounting. Both nodes
are this machine (NodeAddr=127.0.0.1, one port each); their names do not resolve, so jobs need
MASTER_ADDR=127.0.0.1. Every daemon is a child process started here and stopped by its PID.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing_binaries() -> list[str]:
    """The SLURM / munge programs this machine lacks (install: apt-get install slurmctld slurmd slurm-client munge)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


SLURM_CONF = """\
ClusterName=freeatten-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge-socket/munge.socket,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
FirstJobId={first_job_id}
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port={n1_port} CPUs={cpus} RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port={n2_port} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` is the environment that points clients at it."""

    def __init__(self, root: Path, cpus_per_node: int = 4) -> None:
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.processes: list[subprocess.Popen] = []
        self._logs: list = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 (open while the daemon runs)
        self._logs.append(log)
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for folder in ("munge", "munge-socket", "state", "spool/n1", "spool/n2"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        for folder in ("munge", "munge-socket"):
            shutil.chown(self.root / folder, "munge", "munge")
        (self.root / "munge").chmod(0o700)
        (self.root / "munge-socket").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        ctld_port, slurmd_port, n1_port, n2_port = _free_ports(4)
        conf = SLURM_CONF.format(
            host=socket.gethostname().split(".")[0],
            root=self.root,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
            n1_port=n1_port,
            n2_port=n2_port,
            cpus=self.cpus_per_node,
            first_job_id=1000 + int.from_bytes(os.urandom(2), "little") % 8000,
        )
        (self.root / "slurm.conf").write_text(conf)
        munge, socket_path = self.root / "munge", self.root / "munge-socket" / "munge.socket"
        files = [f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}"]
        files += [f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"]
        as_munge = ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups"]  # execs: the PID is munged's
        self._spawn("munged", [*as_munge, "munged", "--foreground", *files])
        self._wait_for(socket_path.exists, timeout, "munged")
        conf_path = str(self.root / "slurm.conf")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", conf_path])
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", conf_path])
        self._wait_for(self._nodes_idle, timeout, "two idle nodes")

    def _nodes_idle(self) -> bool:
        result = self.run(["sinfo", "--Node", "--noheader", "--format=%N %t"], check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p.args for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.out")))
                raise RuntimeError(f"local SLURM cluster: no {what} after {timeout:.0f} s (exited: {dead})\n{logs}")
            time.sleep(0.2)

    def run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check)

    def job_field(self, job_id: str, field: str) -> str:
        """One field of `scontrol show job` (e.g. JobState, Restarts, ExitCode)."""
        text = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        for item in text.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        raise KeyError(f"{field} not in scontrol output: {text}")

    def wait_until(self, job_id: str, states: set[str], timeout: float) -> str:
        """Poll the job's state (squeue/scontrol, not `sbatch --wait`, which polls slowly) until it is in `states`."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state} after {timeout:.0f} s, waiting for {sorted(states)}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then stop the daemons (newest first) by PID."""
        if self._alive():
            self.run(["scancel", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while self.run(["squeue", "--noheader"], check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.3)
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _alive(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)
