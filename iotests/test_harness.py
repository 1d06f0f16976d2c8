"""The harness itself: a missing oracle tool fails the run (never a silent skip), unless the
developer opts out explicitly with BLOCKD_ALLOW_MISSING_ORACLES=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pytest_without_tools(tmp_path: Path, allow: str = "") -> subprocess.CompletedProcess:
    """Collects one test file in a child pytest whose PATH holds no tool at all."""
    empty = tmp_path / "empty-path"
    empty.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("QSD", "BLOCKD_ALLOW_MISSING_ORACLES")}
    env["PATH"] = str(empty)
    if allow:
        env["BLOCKD_ALLOW_MISSING_ORACLES"] = allow
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
         str(HERE / "test_qmp_protocol.py")],
        cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )


def test_missing_oracle_tools_fail_the_run(tmp_path):
    proc = _pytest_without_tools(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "oracle tools not installed: qemu-img, qemu-io, nbdinfo, nbdcopy" in proc.stdout, proc.stdout
    # "yes", "true" ... are no opt-out: only the explicit 1 is.
    proc = _pytest_without_tools(tmp_path / "yes", allow="yes")
    assert proc.returncode != 0, proc.stdout


def test_explicit_opt_out_runs_anyway(tmp_path):
    proc = _pytest_without_tools(tmp_path, allow="1")
    assert proc.returncode == 0, proc.stdout
    assert "collected" in proc.stdout or "tests collected" in proc.stdout, proc.stdout
