"""ParamikoHost's handling of a kept SSH connection that died while idle (seen on the CI cluster: the control plane
was reset, and the next phase's first command met "Connection reset by peer" on the old connection)."""
from __future__ import annotations

import io

import pytest

from lab.errors import RemoteError
from lab.remote.host import ParamikoHost


class Channel:
    def __init__(self, rc):
        self.rc = rc

    def shutdown_write(self):
        pass

    def recv_exit_status(self):
        return self.rc


class Stream(io.BytesIO):
    def __init__(self, data=b"", rc=0):
        super().__init__(data)
        self.channel = Channel(rc)


class Client:
    """A paramiko SSHClient stand-in: each exec_command takes the next scripted outcome."""

    def __init__(self, outcomes):
        self.outcomes, self.commands = list(outcomes), []

    def exec_command(self, line, timeout=None):
        self.commands.append(line)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return Stream(), Stream(outcome.encode()), Stream()

    def close(self):
        pass


def host_with(monkeypatch, first: Client, fresh: list[Client]) -> ParamikoHost:
    host = ParamikoHost("cp1", "192.0.2.10", "lab", key_path="/nonexistent", host_key_line="ssh-ed25519 AAAA")
    host._client = first

    def connect(timeout=15):
        host._client = fresh.pop(0)

    monkeypatch.setattr(host, "connect", connect)
    return host


def test_a_dead_idle_connection_is_replaced_once_before_the_command_starts(monkeypatch):
    dead = Client([ConnectionResetError(104, "Connection reset by peer")])
    fresh = Client(["ok\n"])
    host = host_with(monkeypatch, dead, [fresh])
    result = host.run("kubectl", "get", "nodes")
    assert result.ok and result.stdout == "ok\n"
    assert len(dead.commands) == 1 and len(fresh.commands) == 1


def test_a_failure_on_the_fresh_connection_is_a_transport_error(monkeypatch):
    dead = Client([ConnectionResetError(104, "Connection reset by peer")])
    also = Client([EOFError()])
    host = host_with(monkeypatch, dead, [also])
    with pytest.raises(RemoteError, match="SSH transport failed running"):
        host.run("kubectl", "get", "nodes")
