"""The namespace lab of the multi-host test leaves nothing behind, even when the test inside it fails."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.netns import NetnsLab, netns_unavailable


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_a_failing_test_leaves_no_namespace_and_no_process(tmp_path):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces are not available here: {reason}")
    lab = NetnsLab(["a", "b"], subnet=f"99.{os.getpid() % 250}")
    with pytest.raises(RuntimeError, match="the test failed"), lab:
        assert {host.netns for host in lab.hosts.values()} | {lab.switch} <= namespaces()
        # A process that spawns a child of its own, like a service starting vLLM's engine.
        script = "sleep 1000 & echo started; wait"
        leader = lab.start("a", ["sh", "-c", script], tmp_path, dict(os.environ), subprocess.PIPE)
        assert leader.stdout.readline() == b"started\n"
        child = subprocess.run(["pgrep", "-g", str(leader.pid), "sleep"], check=False, capture_output=True, text=True)
        assert child.stdout.strip(), "the child never started"
        raise RuntimeError("the test failed")
    assert not namespaces() & ({host.netns for host in lab.hosts.values()} | {lab.switch})
    assert leader.poll() is not None
    leader.stdout.close()
    group = subprocess.run(["pgrep", "-g", str(leader.pid)], check=False, capture_output=True)
    assert group.returncode == 1, group.stdout  # the group is empty
