"""An interrupted VM run leaves nothing behind.

`molecule test` can be killed at any step (CI timeout, Ctrl-C); molecule's own destroy does not
run then. files/vm.sh ties the VMs to a lease on the molecule process that booted them: this
boots one VM from the scenario's cached image under a stand-in "molecule" process, kills that
process with SIGKILL and checks that the VM, its tap, bridge, namespace, host link and state
directory are all gone. Runs after the default scenario (which builds the image).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent
VM_SCRIPT = HERE / "files" / "vm.sh"
CACHE = Path("/var/cache/pgvpn")
NETNS = "pgvpn-teardown-test"
HOST_IF = "pgvpntd0"
STATE = Path("/var/lib/pgvpn-teardown-test")


def cached_image() -> Path:
    images = sorted(CACHE.glob("vm-*/base.qcow2"), key=lambda p: p.stat().st_mtime)
    if not images:
        message = f"no VM image under {CACHE}: run `molecule test -s default` first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return images[-1].parent


def netns_exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return any(line.split()[0] == name for line in out.stdout.splitlines() if line.strip())


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this test counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"after {seconds} s: {what}")
        time.sleep(0.2)


def down() -> None:
    subprocess.run(["bash", str(VM_SCRIPT), "down", str(STATE), NETNS, HOST_IF, ""],
                   capture_output=True, check=False)


def test_killed_run_tears_the_vms_down() -> None:
    image = cached_image()
    down()
    up = shlex.join(["bash", str(VM_SCRIPT), "up", str(STATE), NETNS, HOST_IF, "10.199.80.1/24",
                     str(image), "tcg", "256", "td1=10.199.80.10"])
    # $0 = "molecule": vm.sh takes the nearest ancestor named so as the run holding the lease.
    holder = subprocess.Popen(["bash", "-c", f"{up} && exec sleep 600", "molecule"],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid_file = STATE / "td1" / "pid"
        wait_for(pid_file.exists, 60, f"qemu did not start ({STATE}/keeper.log)")
        qemu = int(pid_file.read_text())
        keeper = int((STATE / "keeper.pid").read_text())
        assert alive(qemu) and alive(keeper)
        assert netns_exists(NETNS) and link_exists(HOST_IF)
        ns_pids = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True,
                                 text=True, check=True).stdout.split()
        assert str(qemu) in ns_pids, "qemu runs in the scenario's namespace"

        holder.send_signal(signal.SIGKILL)
        holder.wait()

        wait_for(lambda: not alive(qemu), 30, f"qemu {qemu} outlived the killed run")
        wait_for(lambda: not alive(keeper), 30, f"keeper {keeper} outlived the killed run")
        wait_for(lambda: not netns_exists(NETNS), 30, f"namespace {NETNS} left behind")
        assert not link_exists(HOST_IF), f"host link {HOST_IF} left behind"
        assert not STATE.exists(), f"{STATE} left behind"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        down()
