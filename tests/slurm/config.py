"""The configuration files of the one-node test cluster, as text: data in, text out, nothing started.

Every value here is one that a test on this kind of machine needed; the comments say what goes wrong
without it. The daemons themselves are started by ``cluster.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "kdbench"
PARTITION = "debug"
NODE = "localhost"
DATABASE = "slurm_acct_db"
DATABASE_USER = "slurm"


@dataclass(frozen=True)
class Ports:
    """The TCP ports on 127.0.0.1 that one start of the cluster listens on."""

    slurmctld: int
    slurmd: int
    slurmdbd: int
    mariadb: int


@dataclass(frozen=True)
class Node:
    """What the one node offers: Slurm drains a node that claims more CPUs or memory than it has."""

    cpus: int
    real_memory_mb: int

    @property
    def memory_per_cpu_mb(self) -> int:
        return max(1, self.real_memory_mb // self.cpus)


@dataclass(frozen=True)
class Layout:
    """Where one start keeps its files; every path sits under ``state_dir``, which is new for each start."""

    state_dir: Path

    @property
    def etc(self) -> Path:
        return self.state_dir / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        """slurmdbd reads ``slurmdbd.conf`` from the folder of ``SLURM_CONF``; it must be 0600."""
        return self.etc / "slurmdbd.conf"

    @property
    def plugstack_conf(self) -> Path:
        return self.etc / "plugstack.conf"

    @property
    def munge_dir(self) -> Path:
        return self.state_dir / "munge"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def mariadb_dir(self) -> Path:
        return self.state_dir / "mariadb"

    @property
    def mariadb_socket(self) -> Path:
        return self.state_dir / "mariadb.sock"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def spool(self) -> Path:
        return self.state_dir / "spool"

    @property
    def work(self) -> Path:
        """Job folders of the tests: inside the state folder, so never shared between two starts."""
        return self.state_dir / "work"


def local_node() -> Node:
    """The CPUs this process may use and a little under ``MemTotal`` (slurmd reads it in MiB)."""
    cpus = len(os.sched_getaffinity(0))
    total_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    total_mb = total_kb // 1024
    return Node(cpus=cpus, real_memory_mb=max(256, total_mb - max(256, total_mb // 20)))


def slurm_conf(layout: Layout, ports: Ports, node: Node, spank_pbs: Path | None) -> str:
    """``slurm.conf`` for one node on 127.0.0.1, run as root, with accounting through slurmdbd."""
    spool = layout.spool
    lines = [
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={ports.slurmctld}",
        f"SlurmdPort={ports.slurmd}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also delays a requeued job's restart (120 s by default).
        f"AuthInfo=socket={layout.munge_socket},cred_expire=5",
        f"StateSaveLocation={spool / 'slurmctld'}",
        f"SlurmdSpoolDir={spool / 'slurmd'}",
        f"SlurmctldPidFile={spool / 'slurmctld.pid'}",
        f"SlurmdPidFile={spool / 'slurmd.pid'}",
        f"SlurmctldLogFile={layout.logs / 'slurmctld.log'}",
        f"SlurmdLogFile={layout.logs / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # Containers here have no usable cgroup tree: track processes through /proc and bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        # Without DefMemPerCPU one job is given the whole node's memory and jobs run one at a time.
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        f"DefMemPerCPU={node.memory_per_cpu_mb}",
        # The default batch delay costs about 3 s per job start; a requeued job waits for cred_expire and
        # then for the backfill scheduler, which runs every 30 s by default.
        "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2",
        # In 22.05 this belongs here, not under SchedulerParameters; without it the dependants of a
        # failed job pend forever.
        "DependencyParameters=kill_invalid_depend",
        "JobRequeue=1",
        "MinJobAge=60",
        "KillWait=2",
        "InactiveLimit=0",
        "AccountingStorageType=accounting_storage/slurmdbd",
        f"AccountingStorageHost={NODE}",
        f"AccountingStoragePort={ports.slurmdbd}",
        # For slurmdbd connections this "password" names the munge socket; AuthInfo is not used there.
        f"AccountingStoragePass={layout.munge_socket}",
        "JobAcctGatherType=jobacct_gather/linux",
        "JobAcctGatherFrequency=30",
    ]
    if spank_pbs is not None:
        lines.append(f"PlugStackConfig={layout.plugstack_conf}")
    lines += [
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={node.cpus} RealMemory={node.real_memory_mb} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def slurmdbd_conf(layout: Layout, ports: Ports, password: str) -> str:
    """``slurmdbd.conf``: slurmdbd on 127.0.0.1 storing into MariaDB over TCP on 127.0.0.1."""
    lines = [
        "AuthType=auth/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"DbdHost={NODE}",
        "DbdAddr=127.0.0.1",
        f"DbdPort={ports.slurmdbd}",
        "SlurmUser=root",
        "DebugLevel=info",
        f"LogFile={layout.logs / 'slurmdbd.log'}",
        f"PidFile={layout.spool / 'slurmdbd.pid'}",
        "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1",
        f"StoragePort={ports.mariadb}",
        f"StorageUser={DATABASE_USER}",
        f"StoragePass={password}",
        f"StorageLoc={DATABASE}",
    ]
    return "\n".join(lines) + "\n"


def plugstack_conf(spank_pbs: Path) -> str:
    """Loads ``spank_pbs.so``: only then do jobs see ``PBS_JOBID``, ``PBS_ARRAY_INDEX`` and ``PBS_O_WORKDIR``."""
    return f"required {spank_pbs}\n"


def database_setup_sql(password: str) -> str:
    """Creates the accounting database and the user slurmdbd connects as (from 127.0.0.1 only)."""
    return (
        f"CREATE DATABASE {DATABASE};\n"
        f"CREATE USER '{DATABASE_USER}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL ON {DATABASE}.* TO '{DATABASE_USER}'@'127.0.0.1';\n"
    )
