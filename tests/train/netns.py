"""Two "hosts" on one Linux machine, for multi-node tests: two network namespaces joined by a veth pair.

Each host has its own network stack (loopback plus one end of the veth, no route anywhere else), its own hostname
and its own /etc/hosts naming both hosts, as two machines on one LAN would. A command runs on a host through
`ip netns exec NS unshare --uts --mount ...`; the hostname and the hosts file are private to that command's
namespaces, so nothing on the machine itself changes. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 and
util-linux's unshare; `create_hosts` raises `HostsUnavailable` saying what failed otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# A /30 nobody routes here: the namespaces are isolated anyway, the addresses only need to differ from each other.
SUBNET_PREFIX = "10.213.0"
PREFIX_LENGTH = 30

# Runs inside the host's fresh UTS and mount namespaces: set the hostname, put the hosts file over /etc/hosts, then
# become the command. $0 is the hostname, $1 the hosts file, the rest the command.
_ENTER_HOST = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'


class HostsUnavailable(RuntimeError):
    """The namespaces could not be made here (not root, no CAP_NET_ADMIN, no `ip`, ...)."""


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str
    hostname: str
    hosts_file: Path

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "unshare",
            "--uts",
            "--mount",
            "sh",
            "-c",
            _ENTER_HOST,
            self.hostname,
            str(self.hosts_file),
            *argv,
        ]


@dataclass
class TwoHosts:
    hosts: tuple[Host, Host]
    _created: list[str] = field(default_factory=list)

    def kill_processes(self) -> None:
        """SIGKILL whatever still runs inside the namespaces (leftover launchers and workers)."""
        for namespace in self._created:
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        """Kill what runs inside, then delete the namespaces (the veth pair goes with them)."""
        self.kill_processes()
        for namespace in reversed(self._created):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
        self._created.clear()
        # A veth pair still in the machine's own namespace (creation stopped half-way); deleting one end deletes both.
        subprocess.run(["ip", "link", "delete", self.hosts[0].interface], capture_output=True, check=False)


def _ip(*arguments: str) -> None:
    completed = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(arguments)}` failed: {completed.stderr.strip() or completed.returncode}")


def create_hosts(
    folder: Path, hostnames: tuple[str, str] = ("tl-node0", "tl-node1"), names_on_loopback: bool = False
) -> TwoHosts:
    """Two hosts, `hostnames[0]` at SUBNET_PREFIX.1 and `hostnames[1]` at .2. With `names_on_loopback` the hosts
    file maps each hostname to 127.0.1.1 instead, as Debian and many container images do (the case where gloo and
    torchrun's hostname heuristics pick an address the other node cannot reach). Call `remove()` when done (also
    after a failure: whatever was created is removed)."""
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            raise HostsUnavailable(f"`{tool}` is not installed")
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root (CAP_NET_ADMIN)")
    # Names unique to this process, so parallel sessions do not collide; interface names are at most 15 characters.
    tag = f"{os.getpid() % 100000}"
    folder.mkdir(parents=True, exist_ok=True)
    hosts_file = folder / "hosts"
    addresses = [f"{SUBNET_PREFIX}.1", f"{SUBNET_PREFIX}.2"]
    hosts_file.write_text(
        "127.0.0.1 localhost\n"
        + "".join(
            f"{'127.0.1.1' if names_on_loopback else address} {name}\n"
            for address, name in zip(addresses, hostnames, strict=True)
        )
    )
    hosts = tuple(
        Host(f"tuneloop-{tag}-{index}", f"tl{tag}v{index}", addresses[index], hostnames[index], hosts_file)
        for index in range(2)
    )
    pair = TwoHosts((hosts[0], hosts[1]))
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            pair._created.append(host.namespace)
        _ip("link", "add", hosts[0].interface, "type", "veth", "peer", "name", hosts[1].interface)
        for host in hosts:
            _ip("link", "set", host.interface, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
        for host in hosts:  # the hostname and hosts-file step needs CAP_SYS_ADMIN too: try it once
            probe = subprocess.run(host.command(["true"]), capture_output=True, text=True, check=False, timeout=30)
            if probe.returncode != 0:
                raise HostsUnavailable(f"entering host {host.hostname} failed: {probe.stderr.strip()}")
    except BaseException:
        pair.remove()
        raise
    return pair
