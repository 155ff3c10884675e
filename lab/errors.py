"""Typed errors. Library code raises these; only ``lab.cli`` (and the conformance harness) turn them into exit
codes.

Every error carries a ``hint``: the next thing the user should run or change. One base, two families:
``LabError`` for the provisioner, ``ConformanceError`` (``conformance.kube``) for the suite.
"""
from __future__ import annotations


class KvmlabError(Exception):
    """Base of every kvmlab error: a message, a hint naming the fix, and the exit code the CLI uses."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class LabError(KvmlabError):
    """An error of the lab provisioner."""


class SpecError(LabError):
    """The lab spec is invalid. ``problems`` lists every problem as (path, message)."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], source: str = "lab spec"):
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s):"]
        lines += [f"  - {path}: {msg}" if path else f"  - {msg}" for path, msg in problems]
        super().__init__("\n".join(lines), hint="fix the fields above and run the command again")

    def __str__(self) -> str:
        return self.message


class UsageError(LabError):
    """Bad command-line input."""

    exit_code = 2


class ImageError(LabError):
    """An image cannot be found, downloaded or verified."""


class VirtError(LabError):
    """libvirt refused or failed an operation."""


class RemoteError(LabError):
    """A command on a node failed or the node could not be reached."""


class WaitTimeout(LabError):
    """A wait ran past its deadline (lab and conformance alike). The message says what it waited for, how long,
    and the last state seen."""


class PhaseError(LabError):
    """A phase failed; wraps the underlying error with the phase name."""
