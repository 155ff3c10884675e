"""join: workers join concurrently with a 15-minute token, retrying while the API server is still coming up."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lab.errors import LabError
from lab.kubectl import cp_host, kubectl
from lab.logs import save_journals
from lab.phase import Phase, run_on_nodes, skip_without_kubernetes
from lab.render.kubeadm import join_configuration
from lab.wait import matches_any, retry_command

if TYPE_CHECKING:
    from lab.phase import Context

JOIN_YAML = "/run/lab/kubeadm-join.yaml"  # tmpfs: the token never reaches the node's disk
TOKEN_TTL = "15m"
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"  # written by a join: the worker belongs to some control plane

#: kubeadm join failures that mean "the control plane is not answering yet": worth retrying until the deadline.
#: "could not find a JWS signature" is the bootstrap-signer race right after init.
API_NOT_READY = (r"connection refused", r"i/o timeout", r"no route to host", r"TLS handshake timeout",
                 r"context deadline exceeded", r"unexpected EOF", r"the server is currently unable",
                 r"could not find a JWS signature", r"etcdserver: request timed out",
                 r"connection reset by peer", r"Client\.Timeout exceeded")
api_not_ready = matches_any(API_NOT_READY)

_JOIN_CMD = re.compile(r"--token\s+(\S+).*--discovery-token-ca-cert-hash\s+(\S+)", re.S)


def parse_join_command(text: str) -> tuple[str, str]:
    """(token, ca-cert-hash) from ``kubeadm token create --print-join-command``."""
    match = _JOIN_CMD.search(text)
    if not match:
        raise LabError(f"unexpected output of kubeadm token create: {text.strip()[:200]!r}",
                       hint="run `lab ssh <control-plane> sudo kubeadm token create --print-join-command`")
    return match.group(1), match.group(2)


def joined_nodes(ctx: "Context") -> set[str]:
    res = kubectl(cp_host(ctx), "get", "nodes", "-o", "name", check=False, timeout=60)
    return {line.split("/", 1)[-1] for line in res.stdout.split()} if res.ok else set()


class Join(Phase):
    name = "join"

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx) or (None if ctx.lab.workers else "no worker nodes")

    def done(self, ctx: "Context") -> bool:
        return {w.name for w in ctx.lab.workers} <= joined_nodes(ctx)

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        pending = [w for w in lab.workers if w.name not in joined_nodes(ctx)]
        cp = cp_host(ctx)
        out = cp.run("kubeadm", "token", "create", "--ttl", TOKEN_TTL, "--print-join-command", sudo=True).stdout
        token, ca_hash = parse_join_command(out)
        hosts = {w.name: ctx.host(w.name) for w in pending}

        def join(name: str) -> None:
            host = hosts[name]
            if host.run("test", "-e", KUBELET_CONF, check=False, sudo=True).ok:
                # joined before, but not a Node of this control plane (it was reset, or the join half-done)
                ctx.log.warn(f"{name}: joined to an earlier control plane, not to this one; kubeadm reset")
                host.run("kubeadm", "reset", "--force", sudo=True, timeout=lab.timeouts.command)
            host.run("install", "-d", "-m", "0700", "/run/lab", sudo=True)
            host.put(JOIN_YAML, join_configuration(lab, lab.node(name), token, ca_hash), mode=0o600)
            try:
                retry_command(host, "kubeadm", "join", "--config", JOIN_YAML, sudo=True,
                              what=f"kubeadm join of {name}", deadline_s=lab.timeouts.join,
                              transient=api_not_ready, interval=5.0, log=ctx.log.info,
                              before_retry=lambda: host.run("kubeadm", "reset", "--force", check=False,
                                                            sudo=True, timeout=300))
            except LabError:
                save_journals(ctx, name)
                raise
            finally:
                host.run("rm", "-f", JOIN_YAML, check=False, sudo=True)
            ctx.log.info(f"{name}: joined")

        ctx.log.info(f"joining {', '.join(hosts)} concurrently (each ≤ {lab.timeouts.join}s)")
        run_on_nodes(list(hosts), join, ctx.cancel)
