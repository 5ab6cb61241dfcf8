"""A local Ray started by everloop keeps all of its traffic on loopback: every socket its processes
listen on (TCP and UDP), and every connection they make, is on 127.0.0.1 (or ::1), checked with `ss`."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from tests.batch.conftest import ray_or_skip


def is_loopback(address: str) -> bool:
    """Whether `ss`'s `host:port` (`[v6]:port`, `*:port`, `host%iface:port`) is a loopback address."""
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host == "*":  # every interface
        return False
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def sockets(*flags: str) -> list[tuple[str, str, set[int], str]]:
    """`ss -H -n -p FLAGS`'s sockets of one protocol (FLAGS names one: with two, `ss` adds a column):
    (local address, peer address, owning pids, the whole line)."""
    if shutil.which("ss") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ss (iproute2) is required under CI=true")
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-H", "-n", "-p", *flags], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5:  # state, recv-q, send-q, local, peer[, process]
            rows.append((fields[3], fields[4], {int(p) for p in re.findall(r"pid=(\d+)", line)}, line))
    return rows


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc): the driver and the processes Ray started."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in found]
        found.update(children)
        frontier.extend(children)
    return found


def test_is_loopback_reads_ss_addresses():
    assert [is_loopback(a) for a in ("127.0.0.1:6379", "[::1]:4369", "[::ffff:127.0.0.1]:35847",
                                     "127.0.0.1%lo:53")] == [True] * 4
    assert [is_loopback(a) for a in ("*:33251", "0.0.0.0:2024", "[::]:22", "192.0.2.2:32907",
                                     "[::ffff:192.0.2.2]:80")] == [False] * 5


def test_local_ray_listens_and_talks_on_loopback_only(ray_local):
    ray = ray_or_skip()
    assert ray_local["node_ip_address"] == "127.0.0.1"
    assert ray_local["gcs_address"].startswith("127.0.0.1:")
    # Bring up what a scoring run brings up: task workers, an actor pool of Ray Data, its stats actor.
    assert sorted(ray.get([ray.remote(lambda x: x * 2).remote(i) for i in range(4)])) == [0, 2, 4, 6]

    class Double:
        def __call__(self, batch):
            return {"y": batch["id"] * 2}

    out = ray.data.range(8).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    assert sorted(r["y"] for r in out) == [0, 2, 4, 6, 8, 10, 12, 14]

    mine = descendants(os.getpid())
    listening = [s for s in sockets("-l", "-t") + sockets("-l", "-u") if s[2] & mine]
    names = {re.search(r'\(\("([^"]+)"', line).group(1) for *_, line in listening}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers were found: not a vacuous check
    assert [line for local, _, _, line in listening if not is_loopback(local)] == []
    connected = [s for s in sockets("-t") + sockets("-u") if s[2] & mine]  # established, connecting, closing
    assert connected, "Ray's processes talk to each other over TCP: some connection should be seen"
    assert [line for local, peer, _, line in connected
            if not (is_loopback(local) and is_loopback(peer))] == []
