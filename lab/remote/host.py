"""Every remote command goes through ``Host.run(cmd, *args)``: arguments are quoted, the result is a
``CommandResult``. ``ParamikoHost`` talks SSH with a pinned host key; ``LocalHost`` runs here (tests, and
commands a user runs on the hypervisor host).
"""
from __future__ import annotations

import base64
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set, wait_exponential

from lab.errors import RemoteError, WaitTimeout

#: Failures of the transport (worth retrying until a deadline); a refused host key is never among them.
TRANSPORT_ERRORS = (OSError, EOFError, paramiko.SSHException)


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, lines: int = 20) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])


def quote_command(cmd: str, args: tuple[str, ...]) -> str:
    """``cmd`` is a program (or a trusted shell snippet); every arg is quoted."""
    return " ".join([cmd, *(shlex.quote(str(a)) for a in args)])


class Host:
    """The interface phases use. ``check=True`` raises RemoteError with the command's last lines."""

    name: str

    def run(self, cmd: str, *args: str, check: bool = True, sudo: bool = False, timeout: float | None = None,
            input: str | None = None) -> CommandResult:
        line = quote_command(cmd, args)
        if sudo:
            line = "sudo -n -- sh -c " + shlex.quote(line)
        result = self._exec(line, timeout=timeout, input=input)
        if check and not result.ok:
            raise RemoteError(f"{self.name}: `{line}` exited {result.rc}:\n{result.tail()}",
                              hint=f"inspect the node with: lab ssh {self.name}")
        return result

    def put(self, path: str, data: bytes | str, mode: int = 0o644, sudo: bool = True) -> None:
        """Write a file on the host (through sudo tee, so root-owned paths work)."""
        text = data.decode() if isinstance(data, bytes) else data
        self.run("install", "-m", f"{mode:o}", "/dev/stdin", path, sudo=sudo, input=text)

    def _exec(self, line: str, timeout: float | None, input: str | None) -> CommandResult:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalHost(Host):
    def __init__(self, name: str = "localhost", default_timeout: float = 600):
        self.name = name
        self.default_timeout = default_timeout

    def _exec(self, line: str, timeout: float | None, input: str | None) -> CommandResult:
        limit = timeout or self.default_timeout
        try:
            proc = subprocess.run(["sh", "-c", line], capture_output=True, text=True, input=input, timeout=limit)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name}: `{line}` did not finish within {limit:.0f}s") from None
        return CommandResult(line, proc.returncode, proc.stdout, proc.stderr)


class PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse any key that is not the pinned one (paramiko checks known keys; unknown ones land here)."""

    def missing_host_key(self, client, hostname, key):  # noqa: ANN001
        raise paramiko.BadHostKeyException(hostname, key, key)


class ParamikoHost(Host):
    """SSH to a node with our key; the node's host key must equal the pinned one."""

    def __init__(self, name: str, address: str, user: str, key_path: Path, host_key_line: str,
                 port: int = 22, default_timeout: float = 600, cancel: threading.Event | None = None):
        self.name = name
        self.address = address
        self.user = user
        self.port = port
        self.key_path = Path(key_path)
        self.host_key_line = host_key_line  # "ssh-ed25519 AAAA..."
        self.default_timeout = default_timeout
        self.cancel = cancel or threading.Event()  # set by the caller on Ctrl-C: waits stop retrying
        self._client: paramiko.SSHClient | None = None

    def _pinned_client(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        keytype, b64 = self.host_key_line.split()[:2]
        hostkey = paramiko.PKey.from_type_string(keytype, base64.b64decode(b64))
        hostname = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        client.get_host_keys().add(hostname, keytype, hostkey)
        client.set_missing_host_key_policy(PinnedHostKeyPolicy())
        return client

    def connect(self, timeout: float = 15) -> None:
        client = self._pinned_client()
        try:
            client.connect(self.address, port=self.port, username=self.user, key_filename=str(self.key_path),
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           allow_agent=False, look_for_keys=False)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise RemoteError(
                f"{self.name} ({self.address}) presented host key {exc.key.get_base64()[:24]}..., not the pinned "
                f"one: refusing to connect",
                hint="if the node was recreated outside lab, run `lab down` and `lab up` again") from None
        except BaseException:
            client.close()
            raise
        self._client = client

    def wait_connect(self, deadline_s: float) -> None:
        """Connect, retrying transport errors (refused, reset, banner) until ``deadline_s`` seconds pass."""
        start = time.monotonic()
        try:
            for attempt in Retrying(retry=retry_if_exception_type(TRANSPORT_ERRORS), reraise=True,
                                    stop=stop_after_delay(deadline_s) | stop_when_event_set(self.cancel),
                                    wait=wait_exponential(min=1, max=5)):
                with attempt:
                    self.connect(timeout=min(15, max(1.0, deadline_s - (time.monotonic() - start))))
        except TRANSPORT_ERRORS as exc:
            raise WaitTimeout(f"{self.name}: SSH on {self.address}:{self.port} did not accept our key within "
                              f"{deadline_s:.0f}s (last error: {exc or type(exc).__name__})",
                              hint="see the serial console: lab logs; or raise timeouts.ssh") from None

    def _exec(self, line: str, timeout: float | None, input: str | None) -> CommandResult:
        if self._client is None:
            self.connect()
        limit = timeout or self.default_timeout
        try:
            try:
                stdin, stdout, stderr = self._client.exec_command(line, timeout=limit)
            except TRANSPORT_ERRORS:
                # The kept connection died while idle (the node was reset, sshd restarted): no session was opened,
                # so the command never started. One fresh connection; a failure on it is the error below.
                self.close()
                self.connect()
                stdin, stdout, stderr = self._client.exec_command(line, timeout=limit)
            if input is not None:
                stdin.write(input)
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            rc = stdout.channel.recv_exit_status()
        except socket.timeout:
            raise WaitTimeout(f"{self.name}: `{line}` did not finish within {limit:.0f}s") from None
        except TRANSPORT_ERRORS as exc:
            self.close()
            raise RemoteError(f"{self.name}: SSH transport failed running `{line}`: {exc}",
                              hint="the node may have rebooted; run the command again") from None
        return CommandResult(line, rc, out, err)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def new_client_key() -> tuple[str, str]:
    """A fresh ed25519 key pair for the lab: (OpenSSH private PEM, public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public

