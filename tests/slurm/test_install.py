"""What the Slurm fixtures do on a machine that cannot run the cluster; runs anywhere, starts nothing."""
from __future__ import annotations

import pytest

from tests.slurm import install
from tests.slurm.conftest import REQUIRE_SLURM, machine_unavailable
from tests.slurm.install import SlurmUnavailable


def test_a_machine_without_root_cannot_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="needs root"):
        install.ensure_installed()


def test_a_machine_without_apt_get_cannot_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    with pytest.raises(SlurmUnavailable, match="apt-get"):
        install.ensure_installed()


def test_unavailable_slurm_skips_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_SLURM, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        machine_unavailable(SlurmUnavailable("the local Slurm cluster needs root"))


def test_unavailable_slurm_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_SLURM, "1")
    with pytest.raises(pytest.fail.Exception, match="KDBENCH_REQUIRE_SLURM=1 but the local Slurm cluster needs root"):
        machine_unavailable(SlurmUnavailable("the local Slurm cluster needs root"))
