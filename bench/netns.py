"""Two emulated nodes on one machine: two network namespaces joined by a veth pair.

Each namespace holds one end of the pair (named ``veth0`` inside it) with an address of a
private /24 that exists only inside these namespaces, and its loopback. ``set_rate`` limits the
link with ``tc qdisc ... tbf`` on both ends (this kernel has tbf and htb but no netem: bandwidth
can be limited, latency cannot be added). Used as a context manager, the namespaces (and with
them the veth pair and the qdiscs) are removed on exit, on an error and on Ctrl-C; a SIGTERM
is turned into an exit so it cleans up too.

Needs root and ``ip`` (iproute2); :class:`Unavailable` says which is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any

IFNAME = "veth0"


class Unavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or no ``ip``)."""


def check_available() -> None:
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (ip netns add); run as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{' and '.join(missing)} not found (install iproute2)")


def _run(*args: str) -> None:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")


class TwoNodes:
    """Namespaces ``<prefix><pid>a`` and ``...b``, at ``10.<x>.<y>.1`` and ``.2`` on their veth.

    Args:
        prefix: start of the namespace names (the process id follows, so that runs do not clash).
        subnet: the /24's first three octets.
    """

    def __init__(self, prefix: str = "lsgd", subnet: str = "10.213.7") -> None:
        check_available()
        tag = f"{prefix}{os.getpid()}"
        self.names = (f"{tag}a", f"{tag}b")
        self.addresses = (f"{subnet}.1", f"{subnet}.2")
        self.rate_mbit: float | None = None
        self._previous_sigterm: Any = None

    def __enter__(self) -> TwoNodes:
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._exit_on_sigterm)
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
        signal.signal(signal.SIGTERM, self._previous_sigterm)

    @staticmethod
    def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through __exit__, which removes the namespaces

    def _create(self) -> None:
        a, b = self.names
        for name in self.names:
            _run("ip", "netns", "add", name)
        # create the pair inside the first namespace, then move one end: no name in the host's namespace
        _run("ip", "-n", a, "link", "add", IFNAME, "type", "veth", "peer", "name", "vethpeer")
        _run("ip", "-n", a, "link", "set", "vethpeer", "netns", b)
        _run("ip", "-n", b, "link", "set", "vethpeer", "name", IFNAME)
        for name, address in zip(self.names, self.addresses):
            _run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            _run("ip", "-n", name, "link", "set", IFNAME, "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")

    def set_rate(self, mbit: float | None) -> None:
        """Limit both directions to ``mbit`` Mbit/s with tbf (``None``: unlimited, a veth's speed)."""
        for name in self.names:
            subprocess.run(
                ["ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", IFNAME, "root"],
                capture_output=True,
            )
            if mbit is not None:
                # the bucket must hold at least one timer tick's worth of traffic (HZ <= 1000)
                burst = max(32_000, int(mbit * 1e6 / 8 / 250))
                _run(
                    "ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", IFNAME, "root", "tbf",
                    "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms",
                )  # fmt: skip
        self.rate_mbit = mbit

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``node`` (0 or 1)."""
        return ["ip", "netns", "exec", self.names[node], *argv]

    def remove(self) -> None:
        for name in self.names:  # removing a namespace removes its end of the pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
