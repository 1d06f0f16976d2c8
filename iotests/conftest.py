"""pytest fixtures for the iotests (see README.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List

import pytest

import iotests
from iotests import Daemon


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def pytest_sessionstart(session):
    """A missing oracle tool fails the whole run up front (no test may pass without it),
    unless the developer opted out with BLOCKD_ALLOW_MISSING_ORACLES=1."""
    missing = iotests.missing_oracles()
    if missing and os.environ.get(iotests.ALLOW_MISSING) != "1":
        raise pytest.UsageError(
            f"oracle tools not installed: {', '.join(missing)} (Debian: qemu-utils, libnbd-bin). "
            f"The iotests compare against them and fail without them; set "
            f"{iotests.ALLOW_MISSING}=1 to run anyway (tests needing them are then skipped)."
        )


def pytest_report_header(config):
    kind = iotests.DAEMON_KIND
    try:
        binary = iotests.daemon_binary()
    except BaseException:  # pytest.skip raises a BaseException subclass
        binary = "(not found)"
    return f"iotests daemon: {kind} ({binary})"


@pytest.fixture
def make_daemon(tmp_path: Path, request) -> Callable[..., Daemon]:
    """Factory: ``make_daemon(*args, monitors=1, wait=True, name="d")`` starts a daemon.

    Every daemon made is killed at teardown; its log is printed when the
    test failed (pytest shows it under "Captured stdout teardown").
    """
    made: List[Daemon] = []

    def factory(*args: str, monitors: int = 1, wait: bool = True, name: str = "", start: bool = True) -> Daemon:
        d = Daemon(tmp_path, name=name or f"d{len(made)}")
        made.append(d)
        if start:
            d.start(*args, monitors=monitors, wait=wait)
        return d

    yield factory

    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for d in made:
        d.kill()
        if failed:
            print(f"---- log of {d.name} ----\n{d.log()}")


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A daemon with one monitor and no nodes."""
    return make_daemon()
