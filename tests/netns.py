"""Network namespaces joined by a bridge: several "hosts" on one machine, for multi-host tests.

Needs root (CAP_NET_ADMIN) and iproute2; `available()` says whether this machine can create them.
Nothing touches the real network card: the bridge and its /24 exist only between our namespaces.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

SUBNET = "10.231.{}.{}"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None if namespaces can be created here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is missing"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"mfprobe{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """`names` namespaces on one bridge; hosts[name] is its IPv4 address. Use as a context manager."""

    def __init__(self, names: list[str]):
        tag = uuid.uuid4().hex[:4]
        self.bridge = f"mfbr{tag}"
        self.subnet = SUBNET.format(int(tag, 16) % 200 + 20, "{}")
        self.ns = {name: f"mf{tag}{name}" for name in names}
        self.hosts = {name: self.subnet.format(10 + i) for i, name in enumerate(names)}
        self.gateway = self.subnet.format(1)  # the test process's own address on the bridge

    def __enter__(self) -> "Hosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (name, ns) in enumerate(self.ns.items()):
                outside, inside = f"{self.bridge}o{i}", f"{self.bridge}i{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", inside, "netns", ns)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("addr", "add", f"{self.hosts[name]}/24", "dev", inside, ns=ns)
                _ip("link", "set", inside, "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("route", "add", "224.0.0.0/4", "dev", inside, ns=ns)  # mDNS multicast leaves here
        except BaseException:
            self.__exit__()
            raise
        return self

    def prefix(self, name: str) -> list[str]:
        """Prepend to a command to run it on host `name` (same PID: ip execs the command)."""
        return ["ip", "netns", "exec", self.ns[name]]

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth ends along
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
