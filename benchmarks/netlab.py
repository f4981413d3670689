"""A wide-area network lab on one machine: peers in their own network namespaces, with their own addresses.

    with Lab(hosts=3) as lab:                      # root only; see why_no_lab()
        lab.cap(lab.hosts[0], mbit=20)             # 20 Mbit/s up and down
        subprocess.run(lab.hosts[0].command(["python", "peer.py", ...]))
        lab.cut(lab.hosts[1]); lab.restore(lab.hosts[1])
        home = lab.add_host_behind_nat()           # a private address behind a masquerading router

The lab is a bridge in the root namespace holding the subnet's first address (10.77.X.1/24, X
the first subnet no interface of this machine uses) and, per host, a namespace joined to the
bridge by a veth pair: the namespace side gets 10.77.X.N/24 and a default route via the bridge.
Processes in the root namespace reach every host through the bridge address. Names start with
`stl<pid>-<n>`, unique per lab, so that labs of several processes never collide; labs left by
processes that died are removed when a new lab is made. Bandwidth caps are tc's token bucket
filter; latency and loss need netem, which not every kernel has, so the lab does not offer them.

A host behind NAT is a home network: the host's namespace has a private address (192.168.N.2/24)
and its default route via a router namespace, which has a lab address on the bridge and
masquerades what leaves through it (nftables), like a home router: the host reaches everyone,
and nothing from the lab reaches the host (there is no route to its private address, and the
router forwards no port).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

NAME_PREFIX = "stl"
STALE_NAME = re.compile(rf"^{NAME_PREFIX}(\d+)-\d+")
SUBNETS = ipaddress.ip_network("10.77.0.0/16")
MAX_INTERFACE_NAME = 15  # IFNAMSIZ - 1
TBF_LATENCY = "50ms"  # longest a packet waits in the bucket's queue before tbf drops it
TBF_BURST_SECONDS = 0.01  # the bucket holds this much of the rate (at least MIN_BURST_BYTES)
MIN_BURST_BYTES = 32 * 1024  # above the largest packet, and than rate / HZ up to about 1 Gbit/s at HZ 100
_labs = itertools.count()


class LabError(RuntimeError):
    """A lab could not be made or changed; the message holds the command and what it printed."""


def sh(*argv: str, input: str | None = None) -> str:
    """Run a command and return its output; raise LabError with its stderr if it fails."""
    done = subprocess.run(argv, input=input, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def why_no_lab() -> str | None:
    """Why a lab cannot be made on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (Debian package iproute2)"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    try:
        sh("ip", "netns", "add", probe)
    except LabError as error:
        return f"network namespaces cannot be made here: {error}"
    sh("ip", "netns", "delete", probe)
    return None


def why_no_nat() -> str | None:
    """Why Lab.add_host_behind_nat cannot work here (nft missing), or None."""
    if shutil.which("nft") is None:
        return "a NAT router needs `nft` (Debian package nftables: make system-packages)"
    return None


def remove_stale_labs() -> None:
    """Delete namespaces and interfaces of labs whose process no longer exists."""

    def stale(name: str) -> bool:
        match = STALE_NAME.match(name)
        return match is not None and not os.path.exists(f"/proc/{match.group(1)}")

    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if stale(name):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    for line in sh("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if stale(name):
            subprocess.run(["ip", "link", "delete", name], capture_output=True)


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of 10.77.0.0/16 that no interface of the root namespace has an address in."""
    used = {
        ipaddress.ip_interface(word).network
        for line in sh("ip", "-4", "-o", "addr", "show").splitlines()
        for word in line.split()[3:4]
    }
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise LabError(f"every /24 of {SUBNETS} is in use")


@dataclass(frozen=True)
class Host:
    """A machine of the lab: a network namespace with one address on the lab's bridge."""

    namespace: str
    address: str
    inner: str  # the veth inside the namespace: its egress is the host's upload
    outer: str  # its peer on the bridge: its egress is the host's download

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace (`ip netns exec` keeps the process id)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def maddr(self, port: int = 0) -> str:
        """A multiaddr to listen on (host_maddrs) at this host's address."""
        return f"/ip4/{self.address}/tcp/{port}"


class Lab:
    """A bridge and `hosts` namespaces joined to it; removed on close() or leaving the `with` block."""

    def __init__(self, hosts: int) -> None:
        self.prefix = f"{NAME_PREFIX}{os.getpid()}-{next(_labs)}"
        if len(f"{self.prefix}h{hosts}") > MAX_INTERFACE_NAME:
            raise LabError(f"too many hosts or labs for interface names of {MAX_INTERFACE_NAME} characters")
        self.bridge = f"{self.prefix}b"
        self.hosts: list[Host] = []
        self.routers: list[Host] = []  # the home routers of hosts behind NAT
        remove_stale_labs()
        try:
            self.subnet = free_subnet()
            self.gateway = str(self.subnet.network_address + 1)
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            for index in range(1, hosts + 1):
                self._add_host(index)
        except BaseException:
            self.close()
            raise

    def _add_host(self, index: int) -> None:
        host = Host(
            namespace=f"{self.prefix}p{index}",
            address=str(self.subnet.network_address + 1 + index),
            inner=f"{self.prefix}n{index}",
            outer=f"{self.prefix}h{index}",
        )
        self._wire(host, self.hosts, self.gateway, self.subnet.prefixlen)

    def _wire(
        self, host: Host, listed_in: list[Host], gateway: str, prefixlen: int, outer_namespace: str | None = None
    ) -> None:
        """Make the host's namespace (listed for close()) and its veth pair: the outer end on the
        bridge, or in `outer_namespace` (a router's); the inner end with the host's address and a
        default route via `gateway`."""
        sh("ip", "netns", "add", host.namespace)
        listed_in.append(host)
        sh("ip", "link", "add", host.outer, "type", "veth", "peer", "name", host.inner, "netns", host.namespace)
        if outer_namespace is None:
            sh("ip", "link", "set", host.outer, "master", self.bridge, "up")
        else:
            sh("ip", "link", "set", host.outer, "netns", outer_namespace)
        inside = ("ip", "netns", "exec", host.namespace, "ip")
        sh(*inside, "addr", "add", f"{host.address}/{prefixlen}", "dev", host.inner)
        sh(*inside, "link", "set", "lo", "up")
        sh(*inside, "link", "set", host.inner, "up")
        sh(*inside, "route", "add", "default", "via", gateway)

    def add_host_behind_nat(self) -> Host:
        """A new host on a private network of its own behind a masquerading router on the bridge;
        its `address` is private (unreachable from the lab). Appended to `hosts`."""
        index = len(self.hosts) + 1
        router = Host(
            namespace=f"{self.prefix}r{index}",
            address=str(self.subnet.network_address + 100 + index),
            inner=f"{self.prefix}w{index}",
            outer=f"{self.prefix}g{index}",
        )
        self._wire(router, self.routers, self.gateway, self.subnet.prefixlen)
        in_router = ("ip", "netns", "exec", router.namespace)
        sh(*in_router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        private = ipaddress.ip_network(f"192.168.{index}.0/24")
        lan_gateway = str(private.network_address + 1)
        host = Host(
            namespace=f"{self.prefix}p{index}",
            address=str(private.network_address + 2),
            inner=f"{self.prefix}n{index}",
            outer=f"{self.prefix}h{index}",
        )
        self._wire(host, self.hosts, lan_gateway, private.prefixlen, outer_namespace=router.namespace)
        sh(*in_router, "ip", "addr", "add", f"{lan_gateway}/{private.prefixlen}", "dev", host.outer)
        sh(*in_router, "ip", "link", "set", host.outer, "up")
        sh(
            *in_router,
            "nft",
            "-f",
            "-",
            input=f"""
            table ip nat {{
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname "{router.inner}" masquerade
                }}
            }}
        """,
        )
        return host

    def maddr(self, port: int = 0) -> str:
        """A multiaddr on the bridge address, for a process in the root namespace that the hosts reach."""
        return f"/ip4/{self.gateway}/tcp/{port}"

    def cap(self, host: Host, mbit: float) -> None:
        """Limit the host's upload and download to `mbit` Mbit/s each (tc tbf on both veth ends)."""
        burst = max(MIN_BURST_BYTES, int(mbit * 1e6 / 8 * TBF_BURST_SECONDS))
        shape = ("root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", TBF_LATENCY)
        sh("ip", "netns", "exec", host.namespace, "tc", "qdisc", "replace", "dev", host.inner, *shape)
        sh("tc", "qdisc", "replace", "dev", host.outer, *shape)

    def uncap(self, host: Host) -> None:
        """Remove the host's bandwidth caps."""
        subprocess.run(
            ["ip", "netns", "exec", host.namespace, "tc", "qdisc", "del", "dev", host.inner, "root"],
            capture_output=True,
        )
        subprocess.run(["tc", "qdisc", "del", "dev", host.outer, "root"], capture_output=True)

    def cut(self, host: Host) -> None:
        """Unplug the host: its link goes down, packets to and from it go nowhere; its sockets stay open."""
        sh("ip", "link", "set", host.outer, "down")

    def restore(self, host: Host) -> None:
        """Plug a cut host back in."""
        sh("ip", "link", "set", host.outer, "up")
        sh("ip", "netns", "exec", host.namespace, "ip", "route", "replace", "default", "via", self.gateway)

    def bytes_through(self, host: Host) -> tuple[int, int]:
        """(uploaded, downloaded) bytes of the host so far, counted at the bridge side of its link."""
        stats = f"/sys/class/net/{host.outer}/statistics"
        with open(f"{stats}/rx_bytes") as received, open(f"{stats}/tx_bytes") as sent:
            return int(received.read()), int(sent.read())

    def close(self) -> None:
        """Delete the namespaces (their veth ends go with them) and the bridge; safe to call twice."""
        for host in [*self.hosts, *self.routers]:
            # Deleting one end deletes the pair now; a namespace's own devices go later, asynchronously.
            # (A host behind NAT has its outer end in its router's namespace: that goes with the router.)
            subprocess.run(["ip", "link", "delete", host.outer], capture_output=True)
            subprocess.run(["ip", "netns", "delete", host.namespace], capture_output=True)
        self.hosts, self.routers = [], []
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrafficLog:
    """The bytes through some hosts' links (both ways), sampled in the background every `period`
    seconds while the `with` block runs, to count what crossed them between two moments."""

    def __init__(self, lab: Lab, hosts: list[Host], period: float = 0.2) -> None:
        self.lab, self.hosts, self.period = lab, hosts, period
        self.samples: list[tuple[float, list[int]]] = []  # (time.time(), bytes so far per host)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self) -> None:
        self.samples.append((time.time(), [sum(self.lab.bytes_through(host)) for host in self.hosts]))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> TrafficLog:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, start: float, end: float) -> list[int]:
        """Bytes per host from the last sample at or before `start` to the first at or after `end`
        (the whole log where it does not reach that far): at most a period more on each side."""
        first = max((s for s in self.samples if s[0] <= start), key=lambda s: s[0], default=self.samples[0])
        last = min((s for s in self.samples if s[0] >= end), key=lambda s: s[0], default=self.samples[-1])
        return [after - before for before, after in zip(first[1], last[1])]

    def total(self) -> list[int]:
        """Bytes per host over the whole log."""
        return self.between(self.samples[0][0], self.samples[-1][0])
