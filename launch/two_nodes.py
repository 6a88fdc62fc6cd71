#!/usr/bin/env python3
"""Two machines on one: network namespaces joined by a veth pair, for testing what crosses a network.

Each namespace is a node with its own network stack: node 0 at 10.231.0.1, node 1 at 10.231.0.2,
addresses that exist only inside them, joined by one veth pair (optionally shaped with ``tc tbf``
to a bandwidth; the link can be cut and restored). Each node runs ``launch/torchrun_multi_node.sh``
(torchrun with c10d rendezvous at node 0's link address, each node's own address for the link,
gloo bound to the veth). Everything is torn down on the way out — after a failure or a signal
too — and namespaces a killed harness left behind are reaped by the next one (their names carry
the owner's pid). Needs root (``ip netns``); tests skip with the reason where it cannot run.

    sudo python launch/two_nodes.py --nproc 1 [--rate 100mbit] CONFIG [dhdnn train flags...]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "dhdnn"  # namespaces dhdnn<pid>n0, dhdnn<pid>n1 (the owner's pid: stale ones are reaped)
ADDRS = ("10.231.0.1", "10.231.0.2")
PORT = 29400


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "no iproute2 (ip) on this machine"
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def reap() -> list[str]:
    """Delete namespaces of harnesses that are gone (killed by SIGKILL: no chance to clean up)."""
    gone = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and "n" in name[len(PREFIX):]:
            pid = name[len(PREFIX):].split("n")[0]
            if pid.isdigit() and not _alive(int(pid)):
                _kill_inside(name)
                _ip("netns", "del", name, check=False)
                gone.append(name)
    return gone


def _kill_inside(ns: str) -> None:
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class TwoNodes:
    """The two nodes (a context manager). ``rate``: shape the link to this bandwidth (``tc``'s
    notation: ``100mbit``, ``1gbit``)."""

    def __init__(self, rate: str | None = None):
        self.ns = tuple(f"{PREFIX}{os.getpid()}n{i}" for i in range(2))
        self.dev = tuple(f"dh{os.getpid() % 100000}{c}" for c in "ab")  # (interface names: 15 characters at most)
        self.rate, self.procs = rate, []

    def __enter__(self) -> "TwoNodes":
        reap()
        self._old = {s: signal.signal(s, self._raise) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1],
                "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.dev, ADDRS):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            if self.rate:
                self.shape(self.rate)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc) -> bool:
        for p in self.procs:  # every process the nodes ran, with its whole process group
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        for ns in self.ns:
            _kill_inside(ns)
            _ip("netns", "del", ns, check=False)  # (takes the veth pair with it)
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)
        return False

    # ---- the link ------------------------------------------------------------------------------
    def shape(self, rate: str) -> None:
        """Token-bucket shaping of both directions to ``rate`` (tc tbf; netem's latency is not in
        every kernel)."""
        for ns, dev in zip(self.ns, self.dev):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "256kb", "latency", "100ms"], check=True, capture_output=True)

    def link(self, up: bool) -> None:
        """Cut (or restore) the link: node 0's end down takes the carrier from both."""
        _ip("-n", self.ns[0], "link", "set", self.dev[0], "up" if up else "down")

    def link_bytes(self) -> int:
        """Bytes that crossed the link, both directions (each end's transmitted bytes)."""
        total = 0
        for ns, dev in zip(self.ns, self.dev):
            stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", dev).stdout)[0]["stats64"]
            total += stats["tx"]["bytes"]
        return total

    # ---- processes -----------------------------------------------------------------------------
    def popen(self, node: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """``argv`` inside node ``node``'s namespace, in a process group of its own."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[node], *argv], env={**os.environ, **(env or {})},
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def torchrun(self, node: int, config, nproc: int, args=(), env: dict | None = None, max_restarts: int = 0,
                 **kw) -> subprocess.Popen:
        """``launch/torchrun_multi_node.sh CONFIG args`` on node ``node``: rendezvous at node 0's link
        address, this node's own address for the link, gloo on the veth."""
        env = {"NNODES": "2", "NPROC": str(nproc), "RDZV": f"{ADDRS[0]}:{PORT}", "NODE_RANK": str(node),
               "NODE_ADDR": ADDRS[node], "GLOO_SOCKET_IFNAME": self.dev[node], "MAX_RESTARTS": str(max_restarts),
               "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               **(env or {})}
        return self.popen(node, ["bash", str(ROOT / "launch" / "torchrun_multi_node.sh"), str(config),
                                 *map(str, args)], env, **kw)

    def train(self, config, nproc: int, args=(), env: dict | None = None, timeout: float = 600,
              **kw) -> list[subprocess.CompletedProcess]:
        """Both nodes' torchruns to the end: their return codes and output."""
        procs = [self.torchrun(n, config, nproc, args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kw) for n in range(2)]
        deadline = time.monotonic() + timeout
        out = []
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
        return out


def cross_node(records, nproc: int) -> tuple[int, int]:
    """Traced bytes and messages between the two nodes (ranks ``n * nproc ...`` on node ``n``):
    halo and readout messages, and gradient sums whose replica group spans the nodes (two members
    of a ring all-reduce each send the buffer once)."""
    node, total, count = (lambda r: r // nproc), 0, 0
    for m in records:
        spans = len({node(r) for r in m["group"]}) > 1 if m["op"] == "allreduce_grad" else node(m["src"]) != node(m["dst"])
        if spans:
            total, count = total + m["bytes"], count + 1
    return total, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=1, help="workers per node")
    ap.add_argument("--rate", help="shape the link, e.g. 100mbit or 1gbit")
    ap.add_argument("config")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="dhdnn train flags")
    a = ap.parse_args()
    why = unavailable()
    if why:
        print(f"two_nodes: {why}", file=sys.stderr)
        return 2
    with TwoNodes(a.rate) as nodes:
        t, before = time.monotonic(), nodes.link_bytes()
        res = nodes.train(Path(a.config).resolve(), a.nproc, a.args)
        for n, r in enumerate(res):
            print(f"node {n}: exit {r.returncode}\n{r.stdout}{r.stderr[-2000:]}")
        print(f"{nodes.link_bytes() - before} bytes over the link, {time.monotonic() - t:.1f} s")
        return max(r.returncode for r in res)


if __name__ == "__main__":
    sys.exit(main())
