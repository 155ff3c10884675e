"""The one bounded wait of the project, used by the lab phases and the conformance suite alike, and the
retried command built on the same rule.

Every wait names what it waits for, takes its deadline from the caller (the spec's ``timeouts.<x>`` in the lab,
the suite's options in conformance) and raises :class:`lab.errors.WaitTimeout` with the last observation when
the time is up. Only transport failures count as "not yet": an error that is not one propagates at once, so
nothing is ever retried into a pass.
"""
from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

from lab.errors import RemoteError, WaitTimeout

if TYPE_CHECKING:
    from lab.remote.host import CommandResult, Host

T = TypeVar("T")


def is_transport_error(exc: BaseException) -> bool:
    """True for a failure to reach or hear back from the thing observed (node, API server, socket), never for a
    wrong answer: RemoteError (SSH, a node command), OSError (refused, reset, timeouts), WaitTimeout (a nested
    bounded step ran out), urllib3's HTTP-level errors, and a Kubernetes ApiException with status 0 or >= 500."""
    if isinstance(exc, (RemoteError, WaitTimeout, OSError)):
        return True
    try:
        from urllib3.exceptions import HTTPError
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes client
        HTTPError = ()  # type: ignore[assignment]  # noqa: N806
    if HTTPError and isinstance(exc, HTTPError):
        return True
    api = sys.modules.get("kubernetes.client.exceptions")  # not loaded: it cannot be an ApiException
    if api is not None and isinstance(exc, api.ApiException):
        status = exc.status or 0
        return status == 0 or status >= 500
    return False


def api_starting(exc: BaseException) -> bool:
    """For waits on our own cluster with its admin credentials: transport errors, and also 401, 403 and 429. A
    (re)starting API server answers before its authorizer has synced RBAC, and refuses even kubernetes-admin for a
    while (seen: "User kubernetes-admin cannot get resource daemonsets" during an API server restart under TCG);
    429 is its own flow control. A real permission problem still ends at the deadline, with the 403 as last state."""
    if is_transport_error(exc):
        return True
    api = sys.modules.get("kubernetes.client.exceptions")
    return api is not None and isinstance(exc, api.ApiException) and exc.status in (401, 403, 429)


def wait_for(what: str, deadline_s: float, probe: Callable[[], tuple[bool, T]], *, interval: float = 2.0,
             hint: str | None = None, log: Callable[[str], None] | None = None,
             transient: Callable[[BaseException], bool] = is_transport_error) -> T:
    """Call ``probe() -> (done, seen)`` until ``done`` or ``deadline_s`` passes, and return the last ``seen``.

    ``seen`` is what the probe observed: the result when done (a detail text, the ready pods, an address), the
    state to report when not. At the deadline WaitTimeout names ``what``, the deadline and the last ``seen``.
    A transient error from ``probe`` (``transient``: by default :func:`is_transport_error`) counts as "not yet"
    and its text becomes the last ``seen``; any other exception propagates at once."""
    if log:
        log(f"waiting ≤ {deadline_s:.0f}s for {what}")
    start = time.monotonic()
    seen: object = "no observation yet"
    while True:
        try:
            done, seen = probe()
        except Exception as exc:
            if not transient(exc):
                raise
            done, seen = False, f"{type(exc).__name__}: {exc}"
        if done:
            return seen  # type: ignore[return-value]
        elapsed = time.monotonic() - start
        if elapsed >= deadline_s:
            raise WaitTimeout(f"gave up after {deadline_s:.0f}s waiting for {what}; last state: {seen}",
                              hint=hint or "see `lab logs`; raise the matching timeouts.* field if the lab is slow")
        time.sleep(min(interval, max(0.0, deadline_s - elapsed)))


def matches_any(patterns: Iterable[str]) -> Callable[["CommandResult"], bool]:
    """A ``transient`` predicate: True when stdout/stderr matches one of the regexes (case-insensitive)."""
    compiled = [re.compile(p, re.I) for p in patterns]
    return lambda result: any(c.search(result.stdout + "\n" + result.stderr) for c in compiled)


def retry_command(host: "Host", cmd: str, *args: str, what: str, deadline_s: float,
                  transient: Callable[["CommandResult"], bool], sudo: bool = False, input: str | None = None,
                  interval: float = 3.0, before_retry: Callable[[], None] | None = None,
                  log: Callable[[str], None] | None = None) -> "CommandResult":
    """Run a command until it succeeds. A failure that ``transient`` accepts is retried until ``deadline_s``;
    any other failure raises at once with the command's own last lines (never retried into a pass)."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline_s - (time.monotonic() - start)
        result = host.run(cmd, *args, check=False, sudo=sudo, input=input, timeout=max(1.0, remaining))
        if result.ok:
            if attempt > 1 and log:
                log(f"{what}: succeeded on attempt {attempt}")
            return result
        if not transient(result):
            raise RemoteError(f"{host.name}: {what} failed (exit {result.rc}):\n{result.tail()}",
                              hint=f"inspect the node with: lab ssh {host.name}; logs: lab logs")
        elapsed = time.monotonic() - start
        if elapsed + interval >= deadline_s:
            raise WaitTimeout(f"{host.name}: {what} still failing after {attempt} attempt(s) in {elapsed:.0f}s "
                              f"(deadline {deadline_s:.0f}s); last output:\n{result.tail()}",
                              hint="the API server or webhook never became ready; see `lab logs`, or raise the "
                                   "matching timeouts.* field")
        if log:
            log(f"{what}: attempt {attempt} hit a transient error, retrying: {result.tail(1)}")
        time.sleep(interval)
        if before_retry:
            before_retry()
