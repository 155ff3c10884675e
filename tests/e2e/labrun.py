"""Helpers for the end-to-end tests: run the real CLI inside netns `labns`, and reach nodes through it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.remote.host import CommandResult, Host

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "labs" / "ci.yaml"
NETNS = "labns"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]


def in_netns(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv]


def lab_cli(state_dir: Path, *args: str, timeout: float = 1800, input: str | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAB_STATE_DIR": str(state_dir), "COLUMNS": "120"}
    argv = in_netns([sys.executable, "-m", "lab.cli", *args])
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, input=input)
    shown = " ".join(args)[:200]
    print(f"$ lab {shown}  ({time.monotonic() - started:.1f}s, rc {proc.returncode})\n{proc.stderr[-3000:]}"
          f"{proc.stdout[-3000:]}")
    return proc


def virsh(*args: str) -> str:
    return subprocess.run([*VIRSH, *args], capture_output=True, text=True, check=True, timeout=60).stdout


def phases_of(state_dir: Path, lab) -> dict:
    return json.loads((state_dir / lab.name / "state.json").read_text())["phases"]


class NetnsSsh(Host):
    """A node reached through `lab ssh` (OpenSSH, pinned host key) inside the namespace: a user's own path."""

    def __init__(self, name: str, state_dir: Path, spec: Path = SPEC):
        self.name = name
        self.state_dir = state_dir
        self.spec = spec

    def _exec(self, line, timeout, input):
        proc = lab_cli(self.state_dir, "ssh", "-c", str(self.spec), self.name, "--", line, timeout=timeout or 600,
                       input=input)
        return CommandResult(line, proc.returncode, proc.stdout, proc.stderr)


def require_root_and_libvirtd(what: str) -> None:
    """Fail loudly (never skip) when the end-to-end tests cannot run here."""
    import pytest

    if os.geteuid() != 0:
        pytest.fail(f"{what} need root (network namespaces, libvirtd); run `make test` as root")
    check = subprocess.run(["bash", str(ROOT / "scripts/libvirtd-netns.sh"), "status"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        pytest.fail(f"libvirtd is not running inside netns {NETNS}: {check.stdout}{check.stderr}\n"
                    "start it with: bash scripts/libvirtd-netns.sh start")
