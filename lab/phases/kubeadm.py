"""kubeadm: ``kubeadm init --config`` with the rendered kubeadm.yaml on the control plane; output kept in the logs."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lab.errors import RemoteError
from lab.kubectl import ADMIN_CONF, LAB_DIR, cp_host, kubectl
from lab.logs import save_journals, save_log
from lab.phase import Phase, skip_without_kubernetes
from lab.render.kubeadm import PATCHES_DIR, control_plane, kubeadm_patches, render_kubeadm

if TYPE_CHECKING:
    from lab.phase import Context

KUBEADM_YAML = f"{LAB_DIR}/kubeadm.yaml"


def init_failure(node: str, result, log_path) -> RemoteError:
    """kubeadm's own last lines, where the full output is, and the next command to run."""
    return RemoteError(f"{node}: kubeadm init failed (exit {result.rc}); its last lines:\n{result.tail(15)}\n"
                       f"full output: {log_path}",
                       hint="kubelet and containerd journals are in the logs (lab logs); fix and run `lab up` "
                            "again (it resets the half-initialised control plane first)")


class Kubeadm(Phase):
    name = "kubeadm"

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx)

    def done(self, ctx: "Context") -> bool:
        host = cp_host(ctx)
        if not host.run("test", "-s", ADMIN_CONF, check=False, sudo=True).ok:
            return False
        # init got as far as uploading its configuration: the control plane exists
        return kubectl(host, "-n", "kube-system", "get", "configmap", "kubeadm-config", check=False,
                       timeout=60).ok

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        host = cp_host(ctx)
        node = control_plane(lab).name
        if host.run("test", "-e", ADMIN_CONF, check=False, sudo=True).ok:
            ctx.log.warn(f"{node}: a half-initialised control plane is left from an earlier run; kubeadm reset")
            host.run("kubeadm", "reset", "--force", sudo=True, timeout=lab.timeouts.command)
        host.run("install", "-d", "-m", "0700", LAB_DIR, sudo=True)
        host.put(KUBEADM_YAML, render_kubeadm(lab), mode=0o600)
        patches = kubeadm_patches(lab)
        if patches:
            host.run("install", "-d", "-m", "0700", PATCHES_DIR, sudo=True)
            for name, text in patches.items():
                host.put(f"{PATCHES_DIR}/{name}", text, mode=0o600)
        check = host.run("kubeadm", "config", "validate", "--config", KUBEADM_YAML, check=False, sudo=True)
        if not check.ok:
            raise RemoteError(f"{node}: kubeadm rejects the rendered kubeadm.yaml:\n{check.tail()}",
                              hint="compare with `lab render`; report it as a bug in lab/render/kubeadm.py")
        ctx.log.info(f"waiting ≤ {lab.timeouts.kubeadm}s for kubeadm init on {node}")
        result = host.run("kubeadm", "init", "--config", KUBEADM_YAML, check=False, sudo=True,
                          timeout=lab.timeouts.kubeadm)
        log_path = save_log(ctx, "kubeadm-init.log", f"$ {result.command}\n{result.stdout}\n{result.stderr}")
        if not result.ok:
            save_journals(ctx, node)
            raise init_failure(node, result, log_path)
        ctx.log.info(f"{node}: control plane initialised (output in {log_path})")
