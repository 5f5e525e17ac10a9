"""Shared fixtures: a real lab (PostgreSQL, network namespaces, agents) for each test."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgvpn_agent.lab import Lab

_counter = itertools.count(1)


def _needs_root() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, TUN, a PostgreSQL cluster)"
    for tool in ("ip", "ping", "iperf3", "runuser", "psql", "faketime"):
        if shutil.which(tool) is None:
            return f"integration tests need `{tool}` (run scripts/bootstrap)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _needs_root()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run the integration tests: {reason}")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """Bring up labs on demand; every one is torn down after the test, pass or fail."""
    labs: list[Lab] = []

    def make(peers: int = 2, agents: bool = True, **kwargs: Any) -> Lab:
        n = next(_counter)
        workdir = Path(tempfile.mkdtemp(prefix="pgvpn-test-", dir="/tmp"))
        workdir.chmod(0o755)
        lab = Lab.create(workdir, peers=peers, prefix=f"pgvt{os.getpid() % 100000}-{n}-",
                         port=56000 + (os.getpid() * 37 + n) % 1000, **kwargs)
        labs.append(lab)
        lab.up(agents=agents)
        return lab

    yield make
    for lab in labs:
        lab.down()
