"""A real one-node Slurm cluster on 127.0.0.1 for tests: munged, MariaDB, slurmdbd, slurmctld, slurmd.

Each ``start()`` makes a new state folder (``/tmp/kdbench-slurm-XXXX``, 0755 because munged refuses a
socket under folders others cannot enter), new ports and a new database, so a second start in the same
session reuses nothing of the first. ``stop()`` cancels the jobs still queued, then ends exactly the
daemons this object started, by their process ids, newest first.

Clients find the cluster through ``SLURM_CONF`` alone: pass ``cluster.env`` to a subprocess, or set it in
``os.environ`` (the ``slurm_cluster`` fixture does) for code that calls ``sbatch`` or submitit.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Callable, Mapping, Sequence

from tests.slurm import config
from tests.slurm.config import Layout, Ports
from tests.slurm.install import spank_pbs_plugin

DAEMON_STOP_TIMEOUT_S = 20
JOB_DRAIN_TIMEOUT_S = 30
LOG_TAIL_LINES = 25


class ClusterStartError(RuntimeError):
    """A daemon did not come up; the message ends with the tail of its log."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


def run_command(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60,
    stdin: str | None = None, cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Runs a short command to completion, output captured as text; never raises on a non-zero exit."""
    return subprocess.run(
        list(args), input=stdin, env=dict(env) if env is not None else None, cwd=cwd,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def program(name: str) -> str:
    """Full path of a daemon or tool; /usr/sbin is searched too, as a user's PATH may lack it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    found = shutil.which(name, path=search)
    if found is None:
        raise ClusterStartError(f"{name} is not installed (looked in {search})")
    return found


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Daemon:
    """One daemon run in the foreground as a child of this process.

    It writes its own timestamped ``log``; what it prints (a fatal error before the log opens) goes to
    ``output`` beside it.
    """

    def __init__(self, name: str, args: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.name, self.args, self.log, self.env, self.cwd = name, list(args), log, dict(env), cwd
        self.output = log.with_suffix(".out")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.output, "ab") as output:
            self.process = subprocess.Popen(
                [program(self.args[0]), *self.args[1:]], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = DAEMON_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only this daemon's own process id is signalled."""
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def failure(self, what: str) -> ClusterStartError:
        state = "exited with code %s" % self.process.returncode if not self.alive() else "is running"
        tails = "".join(f"\nlast lines of {path}:\n{log_tail(path)}" for path in (self.log, self.output))
        return ClusterStartError(f"{self.name} {what} ({state});{tails}")


def wait_until(check: Callable[[], bool], daemon: Daemon, what: str, timeout: float, interval: float = 0.2) -> None:
    """Polls ``check`` until it holds; fails early with the daemon's log if the daemon exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not daemon.alive():
            raise daemon.failure(f"exited before it {what}")
        if time.monotonic() > deadline:
            raise daemon.failure(f"had not {what} after {timeout:.0f} s")
        time.sleep(interval)


class LocalSlurmCluster:
    """munged, MariaDB, slurmdbd, slurmctld and slurmd for one node, all as root, on 127.0.0.1 only."""

    def __init__(self, base: Path = Path("/tmp"), keep_state: bool = False, start_timeout: float = 60) -> None:
        self.base, self.keep_state, self.start_timeout = base, keep_state, start_timeout
        self.layout: Layout | None = None
        self.ports: Ports | None = None
        self.database_password = ""
        self.daemons: list[Daemon] = []

    @property
    def state_dir(self) -> Path:
        if self.layout is None:
            raise RuntimeError("the Slurm cluster is not started")
        return self.layout.state_dir

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs on top of its environment: where ``slurm.conf`` is."""
        if self.layout is None:
            raise RuntimeError("the Slurm cluster is not started")
        return {"SLURM_CONF": str(self.layout.slurm_conf)}

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def run(
        self, *args: str, timeout: float = 60, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Runs a Slurm client command (``sbatch``, ``squeue``, ``qsub``...) against this cluster."""
        result = run_command(args, env=self.client_env(), timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def new_folder(self, prefix: str = "job") -> Path:
        """A new empty folder for one test's job files (or submitit folder), valid for this start only."""
        self.layout.work.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.layout.work))

    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Starts every daemon in order and waits until the node is idle; on failure stops what started."""
        if self.daemons:
            raise RuntimeError("the Slurm cluster is already started")
        self.layout = Layout(Path(tempfile.mkdtemp(prefix="kdbench-slurm-", dir=self.base)))
        self.ports = Ports(*free_ports(4))
        try:
            self._prepare_folders()
            self._start_munged()
            self._start_mariadb()
            self._write_slurm_configs()
            self._start_slurmdbd()
            self._start_slurmctld()
            self._start_slurmd()
            self.wait_idle(self.start_timeout)
        except BaseException:
            self.stop(remove_state=False)
            raise

    def stop(self, remove_state: bool | None = None) -> None:
        """Cancels queued jobs, stops the daemons this object started (newest first), removes the state."""
        if any(daemon.name == "slurmctld" and daemon.alive() for daemon in self.daemons):
            self._cancel_all_jobs()
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons = []
        remove = not self.keep_state if remove_state is None else remove_state
        if remove and self.layout is not None:
            shutil.rmtree(self.layout.state_dir, ignore_errors=True)

    def node_state(self) -> str:
        """The node's state as ``sinfo`` prints it (``idle``, ``mix``, ``alloc``, ``down*``...), or ''."""
        result = self.run("sinfo", "-h", "-N", "-n", config.NODE, "-o", "%t", timeout=15, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def wait_idle(self, timeout: float = 60) -> None:
        """Waits until ``sinfo`` shows the node idle; fails with slurmd's log if it does not."""
        if not self.daemons:
            raise RuntimeError("the Slurm cluster is not started")
        slurmd = self._daemon("slurmd")
        try:
            wait_until(lambda: self.node_state() == "idle", slurmd, "made the node idle", timeout, interval=0.3)
        except ClusterStartError as error:
            reason = self.run("sinfo", "-h", "-N", "-o", "%t %E", check=False, timeout=15).stdout.strip()
            raise ClusterStartError(f"node state {reason!r}: {error}") from None

    def _daemon(self, name: str) -> Daemon:
        return next(daemon for daemon in self.daemons if daemon.name == name)

    def _spawn(self, name: str, args: Sequence[str]) -> Daemon:
        daemon = Daemon(name, args, self.layout.logs / f"{name}.log", self.client_env(), self.layout.state_dir)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def _prepare_folders(self) -> None:
        layout = self.layout
        os.chmod(layout.state_dir, 0o755)
        for folder in (layout.etc, layout.logs, layout.spool / "slurmctld", layout.spool / "slurmd", layout.work):
            folder.mkdir(parents=True)
        layout.munge_dir.mkdir(mode=0o755)
        layout.mariadb_dir.mkdir(mode=0o700)

    def _start_munged(self) -> None:
        layout = self.layout
        key = layout.munge_key
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        munged = self._spawn("munged", [
            "munged", "--foreground", f"--key-file={key}", f"--socket={layout.munge_socket}",
            f"--pid-file={layout.munge_dir / 'munged.pid'}", f"--seed-file={layout.munge_dir / 'munged.seed'}",
            f"--log-file={layout.logs / 'munged.log'}",
        ])
        wait_until(layout.munge_socket.exists, munged, "opened its socket", self.start_timeout)

    def _start_mariadb(self) -> None:
        layout = self.layout
        installed = run_command([
            program("mariadb-install-db"), "--no-defaults", f"--datadir={layout.mariadb_dir}", "--user=root",
            "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve",
        ], timeout=120)
        (layout.logs / "mariadb-install-db.log").write_text(installed.stdout + installed.stderr)
        if installed.returncode != 0:
            raise ClusterStartError(f"mariadb-install-db failed:\n{log_tail(layout.logs / 'mariadb-install-db.log')}")
        mariadb = self._spawn("mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={layout.mariadb_dir}", f"--socket={layout.mariadb_socket}",
            f"--log-error={layout.logs / 'mariadbd.log'}",
            f"--port={self.ports.mariadb}", "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root",
            f"--pid-file={layout.state_dir / 'mariadbd.pid'}", "--innodb-buffer-pool-size=64M",
        ])
        client = ["--no-defaults", f"--socket={layout.mariadb_socket}", "--user=root"]
        wait_until(lambda: run_command(["mariadb-admin", *client, "ping"]).returncode == 0,
                   mariadb, "answered a ping", self.start_timeout)
        self.database_password = secrets.token_hex(12)
        created = run_command(["mariadb", *client], stdin=config.database_setup_sql(self.database_password))
        if created.returncode != 0:
            raise mariadb.failure(f"did not create the accounting database: {created.stderr.strip()}")

    def _write_slurm_configs(self) -> None:
        layout = self.layout
        spank_pbs = spank_pbs_plugin()
        node = config.local_node()
        layout.slurm_conf.write_text(config.slurm_conf(layout, self.ports, node, spank_pbs))
        layout.slurmdbd_conf.write_text(config.slurmdbd_conf(layout, self.ports, self.database_password))
        os.chmod(layout.slurmdbd_conf, 0o600)
        if spank_pbs is not None:
            layout.plugstack_conf.write_text(config.plugstack_conf(spank_pbs))

    def _start_slurmdbd(self) -> None:
        slurmdbd = self._spawn("slurmdbd", ["slurmdbd", "-D"])
        wait_until(lambda: self.run("sacctmgr", "-n", "-P", "list", "cluster", check=False).returncode == 0,
                   slurmdbd, "answered sacctmgr", self.start_timeout, interval=0.5)
        added = self.run("sacctmgr", "-i", "add", "cluster", config.CLUSTER_NAME, check=False)
        if added.returncode != 0:
            raise slurmdbd.failure(f"did not register the cluster: {added.stdout.strip()} {added.stderr.strip()}")

    def _start_slurmctld(self) -> None:
        slurmctld = self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.layout.slurm_conf)])
        wait_until(lambda: "is UP" in self.run("scontrol", "ping", check=False, timeout=15).stdout,
                   slurmctld, "answered scontrol ping", self.start_timeout, interval=0.3)

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-N", config.NODE, "-f", str(self.layout.slurm_conf)])

    def _cancel_all_jobs(self) -> None:
        """Jobs still queued or running at stop would leave slurmstepd and job processes behind."""
        listed = self.run("squeue", "-h", "-o", "%A", check=False, timeout=15)
        job_ids = listed.stdout.split()
        if not job_ids:
            return
        self.run("scancel", *job_ids, check=False, timeout=15)
        deadline = time.monotonic() + JOB_DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%A", check=False, timeout=15).stdout.split():
                return
            time.sleep(0.3)
