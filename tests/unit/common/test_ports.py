"""Free loopback ports chosen outside the kernel's ephemeral range."""

import socket

import pytest

from rlbus import ports


def test_ports_lie_outside_the_ephemeral_range_are_free_and_never_repeat():
    low, high = ports.ephemeral_range()
    chosen = [ports.free_loopback_port() for _ in range(200)]
    assert len(set(chosen)) == len(chosen)
    assert all(ports.LOWEST_PORT <= port < 65536 and not low <= port <= high for port in chosen)
    for port in chosen[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if the port was not free


def test_the_range_is_read_from_the_kernel_file_or_falls_back(tmp_path):
    custom = tmp_path / "range"
    custom.write_text("20000\t40000\n")
    assert ports.ephemeral_range(custom) == (20000, 40000)
    custom.write_text("garbage")
    assert ports.ephemeral_range(custom) == ports.DEFAULT_EPHEMERAL_RANGE
    assert ports.ephemeral_range(tmp_path / "missing") == ports.DEFAULT_EPHEMERAL_RANGE


@pytest.mark.parametrize(("ephemeral", "first", "last"), [
    ((32768, 60999), 10000, 32767),  # Linux's default: the gap below
    ((10000, 20000), 20001, 65535),  # a low range: the gap above
    ((1024, 65535), None, None),  # everything ephemeral: nothing to choose
])  # fmt: skip
def test_candidates_are_the_larger_gap_around_the_ephemeral_range(ephemeral, first, last):
    candidates = ports.candidate_ports(ephemeral)
    if first is None:
        assert len(candidates) == 0
    else:
        assert (candidates[0], candidates[-1]) == (first, last)


def test_a_held_port_is_not_free():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert not ports.is_free(holder.getsockname()[1])
