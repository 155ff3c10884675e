"""The phase protocol: Phase, the Context phases share, the Log they write to, and run_on_nodes.

A phase is a small object with one verb: ``name``, ``skip_reason(ctx)`` (why it does not apply, or None),
``done(ctx)`` ("already done?" so a rerun continues where it stopped) and ``run(ctx)``. Phases take all their
inputs from the Context, never from module globals. This module is a leaf: it imports no phase (the ordered
lists and the runner are in ``lab.pipeline``, which imports every phase).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.console import Console
from rich.markup import escape

from lab.errors import LabError, RemoteError
from lab.spec import Lab
from lab.state import LabState

if TYPE_CHECKING:
    from lab.images import ResolvedImage
    from lab.remote.host import Host
    from lab.virt.hypervisor import Hypervisor


class Log:
    """Progress for people (rich, on stderr) and a plain log file for ``lab logs``."""

    def __init__(self, path: Path | None = None, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, highlight=False)
        self.path = path
        self.quiet = quiet

    def _file(self, level: str, msg: str) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {level} {msg}\n")

    def info(self, msg: str) -> None:
        self._file("INFO", msg)
        if not self.quiet:
            self.console.print(f"  {msg}", markup=False)

    def warn(self, msg: str) -> None:
        self._file("WARN", msg)
        self.console.print(f"[yellow]  ! {escape(msg)}[/yellow]")

    def phase(self, symbol: str, name: str, detail: str = "") -> None:
        self._file("PHASE", f"{symbol} {name} {detail}")
        if not self.quiet:
            self.console.print(f"{symbol} [bold]{name:<11}[/bold] {escape(detail)}")

    def debug(self, msg: str) -> None:
        self._file("DEBUG", msg)


@dataclass
class Context:
    lab: Lab
    state: LabState
    log: Log
    hosts: dict[str, "Host"] = field(default_factory=dict)
    image: "ResolvedImage | None" = None
    virt_type: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)  # set on Ctrl-C: node workers stop waiting
    _hv: "Hypervisor | None" = None

    @property
    def hv(self) -> "Hypervisor":
        if self._hv is None:
            from lab.virt.hypervisor import Hypervisor

            self._hv = Hypervisor(self.lab.libvirt.uri, warn=self.log.warn)
        return self._hv

    def host(self, node: str) -> "Host":
        """The node's SSH host, connected with the pinned key recorded by the wait phase."""
        if node not in self.hosts:
            from lab.remote.host import ParamikoHost

            record = self.state.get_in("nodes", node)
            if not record or not record.get("ip"):
                raise LabError(f"node {node} has no recorded address", hint="run `lab up` first")
            self.hosts[node] = ParamikoHost(node, record["ip"], self.lab.ssh.user, self.state.ssh_key,
                                            record["host_key"], default_timeout=self.lab.timeouts.command,
                                            cancel=self.cancel)
        return self.hosts[node]

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        self.hosts.clear()
        if self._hv is not None:
            self._hv.close()
            self._hv = None


def run_on_nodes(names: list[str], work: Callable[[str], None], cancel: threading.Event | None = None) -> None:
    """Run ``work(name)`` for every node concurrently; raise one error listing every node that failed.

    Ctrl-C is not held up by the workers' own deadlines: the main thread stops waiting at once, sets
    ``cancel`` (the workers' waits watch it) and re-raises."""
    if not names:
        return
    pool = ThreadPoolExecutor(max_workers=len(names))
    futures = {name: pool.submit(work, name) for name in names}
    try:
        wait(futures.values())
    except BaseException:
        if cancel is not None:
            cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    failures = [(name, fut.exception()) for name, fut in futures.items() if fut.exception() is not None]
    if not failures:
        return
    if len(failures) == 1:
        raise failures[0][1]
    text = "\n".join(f"- {name}: {getattr(exc, 'message', str(exc))}" for name, exc in failures)
    hint = next((exc.hint for _, exc in failures if isinstance(exc, LabError) and exc.hint), None)
    raise RemoteError(f"{len(failures)} of {len(names)} node(s) failed:\n{text}", hint=hint)


class Phase:
    name = "phase"
    #: True for a phase that runs on every `up` because it only checks (preflight, the cluster's readiness) or
    #: resolves what is already cached (image); it creates nothing, so a second `up` running it is still a no-op.
    every_up = False

    def skip_reason(self, ctx: Context) -> str | None:
        return None

    def done(self, ctx: Context) -> bool:
        return False

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


SKIP_NO_K8S = "kubernetes.enabled is false"


def skip_without_kubernetes(ctx: Context) -> str | None:
    """``skip_reason`` of every cluster phase: nothing to do when the spec disables Kubernetes."""
    return None if ctx.lab.kubernetes.enabled else SKIP_NO_K8S
