"""Fixtures for tests against a real one-node Slurm cluster on this machine.

``slurm_cluster`` starts the cluster once per session (installing Slurm first if it is missing) and
puts ``SLURM_CONF`` into ``os.environ`` while it runs, so code under test that calls ``sbatch``,
``squeue``, ``sacct`` or submitit finds it. ``slurm_folder`` gives each test a new folder for its job
files and submitit folders; it lives in the cluster's state folder, so no folder is ever shared by two
cluster starts (job ids restart at 1 with each start, and submitit would read stale results).

A machine that cannot run Slurm (not root, no apt-get) skips these tests with the reason, unless
``KDBENCH_REQUIRE_SLURM=1`` is set (CI sets it): then they fail, so they are never skipped unseen.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

from tests.slurm.cluster import LocalSlurmCluster
from tests.slurm.install import SlurmUnavailable, ensure_installed

REQUIRE_SLURM = "KDBENCH_REQUIRE_SLURM"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on the local one-node Slurm cluster (tests/slurm)")


def machine_unavailable(reason: SlurmUnavailable) -> NoReturn:
    """Skips the test, or fails it when KDBENCH_REQUIRE_SLURM=1 says Slurm tests must run here."""
    if os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{REQUIRE_SLURM}=1 but {reason}", pytrace=False)
    pytest.skip(f"no local Slurm cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_machine() -> None:
    """Installs Slurm if missing; skips (or fails, under KDBENCH_REQUIRE_SLURM=1) where it cannot."""
    try:
        ensure_installed()
    except SlurmUnavailable as reason:
        machine_unavailable(reason)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_machine: None) -> Iterator[LocalSlurmCluster]:
    """The session's cluster, idle at start; ``SLURM_CONF`` is set in ``os.environ`` until it stops."""
    with LocalSlurmCluster() as cluster, pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        yield cluster


@pytest.fixture
def slurm_folder(slurm_cluster: LocalSlurmCluster, request: pytest.FixtureRequest) -> Path:
    """A new folder for this test's job files, inside this cluster start's state folder."""
    return slurm_cluster.new_folder(re.sub(r"[^\w.-]", "_", request.node.name)[:60])
