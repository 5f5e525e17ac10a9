"""A lab whose namespace names another running lab uses refuses to start and leaves that lab
alone; a crashed lab's leftover namespace is taken over."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pgvpn_agent.lab import Lab, LabError

pytestmark = pytest.mark.integration


def _workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="pgvpn-test-", dir="/tmp"))
    workdir.chmod(0o755)
    return workdir


def test_a_second_lab_with_the_same_names_is_refused_and_the_first_keeps_running(make_lab):
    first = make_lab()
    second = Lab.create(_workdir(), prefix=first.prefix, port=first.port + 1)
    try:
        with pytest.raises(LabError, match=f"{first.peers[0].netns} is in use"):
            second.up()
        assert not (second.workdir / "lab.json").exists()
    finally:
        shutil.rmtree(second.workdir)
    a, b = first.peers
    assert first.ping(a, b) and first.ping(b, a, v6=True), "the first lab lost its namespaces"


def test_a_leftover_namespace_nobody_uses_is_taken_over():
    workdir = _workdir()
    lab = Lab.create(workdir, prefix="pgvleft-", port=56990)
    subprocess.run(["ip", "netns", "add", lab.peers[0].netns], check=True)
    try:
        lab.up()
        assert lab.ping(*lab.peers)
    finally:
        lab.down()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.peers[0].netns not in names
