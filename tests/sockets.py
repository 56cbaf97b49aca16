"""The TCP sockets a process tree listens on, to check that nothing it starts is reachable from another machine."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

import psutil


class Listener(NamedTuple):
    pid: int
    name: str  # the process name, to say who listens in a failure message
    ip: str
    port: int


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv6 socket bound to an IPv4-mapped loopback address ("::ffff:127.0.0.1")."""
    address = ipaddress.ip_address(ip.split("%")[0])  # "fe80::1%eth0": a scope id is not part of the address
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def process_tree(root_pid: int) -> list[psutil.Process]:
    """`root_pid` and all its descendants that still exist (a forkserver's children are found through it)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listeners(processes: list[psutil.Process]) -> list[Listener]:
    """Every TCP (v4 and v6) socket in LISTEN state held by `processes`; processes that exit meanwhile are skipped."""
    found = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            name = proc.name()
            found += [Listener(proc.pid, name, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
    return found


def exposed(found: Iterable[Listener]) -> list[Listener]:
    """The listeners another machine could reach: bound to anything but loopback (including every interface)."""
    return sorted(listener for listener in found if not is_loopback(listener.ip))
