"""Installs Debian's Slurm, munge and MariaDB packages when they are missing, or says why it cannot.

The cluster needs root (its daemons run as root and ``apt-get`` installs them); a machine without root
or without ``apt-get`` cannot host it, and ``SlurmUnavailable`` carries the one-line reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge", "slurmdbd", "mariadb-server", "slurm-wlm-torque")
INSTALL_TIMEOUT_S = 900


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster; the message says why."""


def missing_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The packages of ``packages`` that dpkg does not list as installed."""
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not result.stdout.endswith(" installed"):
            missing.append(package)
    return missing


def _apt_get(*args: str) -> None:
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", *args], capture_output=True, text=True, env=environment, timeout=INSTALL_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise SlurmUnavailable(f"apt-get {' '.join(args)} failed: {' | '.join(tail)}")


def ensure_installed(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Installs what is missing of ``packages`` (one ``apt-get update`` first); returns what it installed."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm cluster needs root (its daemons run as root)")
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        raise SlurmUnavailable("the local Slurm cluster needs Debian's apt-get and dpkg to install Slurm")
    missing = missing_packages(packages)
    if missing:
        _apt_get("update")
        _apt_get("install", "-y", "--no-install-recommends", *missing)
        still_missing = missing_packages(packages)
        if still_missing:
            raise SlurmUnavailable(f"apt-get did not install {', '.join(still_missing)}")
    return missing


def spank_pbs_plugin() -> Path | None:
    """Where ``slurm-wlm-basic-plugins`` put ``spank_pbs.so`` (the Torque job environment), if anywhere."""
    result = subprocess.run(
        ["dpkg", "-L", "slurm-wlm-basic-plugins"], capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
        if line.endswith("/spank_pbs.so"):
            return Path(line)
    return None
