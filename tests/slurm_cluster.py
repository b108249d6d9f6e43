"""A real single-node Slurm cluster for the launcher tests (Debian's slurm-wlm 22.05 + munge).

``start_cluster()`` installs the packages when they are missing and we are root (apt-get, a few
seconds), then runs munged, slurmctld and slurmd in the foreground under this process, with every
file in a short temporary directory (unix socket paths are limited to 108 bytes). Tuned for tests:
``cred_expire=5`` and short scheduler intervals make a requeue take ~6 s instead of ~2 min.
Notes and measurements: ../shared/research/slurm_feasibility.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Optional

BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "scancel", "munged", "mungekey"]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed() -> Optional[str]:
    """None when the binaries are there (installing them if needed), else why they are not."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm binaries missing ({', '.join(_missing())}) and cannot apt-get install them (needs root + apt)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or _missing():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(result.stderr or result.stdout)[-500:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _node_line() -> str:
    """This machine's hardware as slurmd reports it (a mismatch drains the node), RealMemory kept
    small so memory never blocks a job."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = next(line for line in out.splitlines() if line.startswith("NodeName="))
    fields = dict(tok.split("=", 1) for tok in first.split())
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    return "NodeName=localhost " + " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + " RealMemory=1000 State=UNKNOWN"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []
        self.cpus = 1

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check)

    def job_states(self, job: str) -> dict[str, dict]:
        """{JobId: fields} for a job or each task of an array (kept for MinJobAge seconds)."""
        res = {}
        for line in self.run("scontrol", "-o", "show", "job", job, check=False).stdout.splitlines():
            kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            if "ArrayTaskId" in kv and "ArrayJobId" in kv:  # an array task: <array job>_<task>
                res[f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}"] = kv
            elif "JobId" in kv:
                res[kv["JobId"]] = kv
        return res

    def queued(self, job: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job, check=False).stdout.strip())

    def wait(self, job: str, timeout: float = 600) -> dict[str, dict]:
        wait_for(lambda: not self.queued(job), timeout, f"Slurm job {job} to finish", interval=0.5)
        return self.job_states(job)

    def cancel_all(self) -> None:
        ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if ids:  # slurmstepd and the job processes outlive slurmd: cancel them first
            self.run("scancel", "--full", *ids, check=False)
            try:
                wait_for(lambda: not self.run("squeue", "-h", "-o", "%A", check=False).stdout.strip(), 60, "queue drain")
            except TimeoutError:
                pass

    def stop(self) -> None:
        self.cancel_all()
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: socket paths <= 108 bytes
    for d in ("etc", "state", "spool", "log", "munge"):
        (root / d).mkdir()
    os.chmod(root, 0o755)  # munged wants o+x on every component of its socket path
    os.chmod(root / "munge", 0o755)
    c = Cluster(root)
    logs = open(root / "log" / "daemons.out", "w")
    quiet = dict(stdout=logs, stderr=subprocess.STDOUT)
    try:
        key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        c.procs.append(subprocess.Popen(
            ["munged", "-F", "-S", str(sock), f"--key-file={key}", f"--log-file={root}/munge/munged.log",
             f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed"], **quiet))
        wait_for(sock.exists, 10, "munged's socket")
        node = _node_line()
        c.cpus = int(dict(t.split("=", 1) for t in node.split())["CPUs"])
        c.conf.write_text(textwrap.dedent(f"""\
            ClusterName=pytest
            SlurmctldHost=localhost
            SlurmctldPort={_free_port()}
            SlurmdPort={_free_port()}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={sock},cred_expire=5
            StateSaveLocation={root}/state
            SlurmdSpoolDir={root}/spool
            SlurmctldPidFile={root}/slurmctld.pid
            SlurmdPidFile={root}/slurmd.pid
            SlurmctldLogFile={root}/log/slurmctld.log
            SlurmdLogFile={root}/log/slurmd.log
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/filetxt
            JobCompLoc={root}/log/jobcomp.log
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            SchedulerParameters=sched_interval=2,bf_interval=1
            MpiDefault=none
            ReturnToService=2
            MailProg=/bin/true
            MinJobAge=600
            KillWait=30
            {node}
            PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
            """))
        c.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(c.conf)], env=c.env, **quiet))
        wait_for(lambda: c.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld")
        c.procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(c.conf)], env=c.env, **quiet))
        wait_for(lambda: c.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 30, "the node to be idle")
    except BaseException:
        c.stop()
        raise
    return c
