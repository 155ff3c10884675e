"""kubeadm: ``kubeadm init --config`` with the rendered kubeadm.yaml on the control plane; output kept in the logs."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lab.errors import LabError, RemoteError
from lab.kubectl import ADMIN_CONF, LAB_DIR, cp_host, kubectl, kubectl_retrying
from lab.logs import save_journals, save_log
from lab.phase import Phase, skip_without_kubernetes
from lab.render.kubeadm import PATCHES_DIR, control_plane, kubeadm_patches, render_kubeadm

if TYPE_CHECKING:
    from lab.phase import Context

KUBEADM_YAML = f"{LAB_DIR}/kubeadm.yaml"
#: Written when ``kubeadm init`` has succeeded: from then on this control plane is never reset by ``lab up``. Without
#: it, an API server that was only restarting when ``up`` ran again (seen under TCG) looked half-initialised, and the
#: whole cluster was reset.
INIT_MARK = f"{LAB_DIR}/kubeadm-init.done"


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
        if not host.run("test", "-e", INIT_MARK, check=False, sudo=True).ok:
            # init started but never finished here: done only if it got as far as uploading its configuration
            return kubectl(host, "-n", "kube-system", "get", "configmap", "kubeadm-config", check=False,
                           timeout=60).ok
        wait_initialised(ctx, host)
        return True

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        host = cp_host(ctx)
        node = control_plane(lab).name
        if host.run("test", "-e", ADMIN_CONF, check=False, sudo=True).ok:
            ctx.log.warn(f"{node}: a half-initialised control plane is left from an earlier run; kubeadm reset")
            host.run("kubeadm", "reset", "--force", sudo=True, timeout=lab.timeouts.command)
        host.run("rm", "-f", INIT_MARK, sudo=True)
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
        host.put(INIT_MARK, f"kubeadm init of Kubernetes {lab.kubernetes.version} succeeded\n", mode=0o600)
        ctx.log.info(f"{node}: control plane initialised (output in {log_path})")


def wait_initialised(ctx: "Context", host) -> None:
    """A control plane that an earlier ``up`` initialised: wait for its API server to answer, never reset it."""
    try:
        kubectl_retrying(ctx, host, "-n", "kube-system", "get", "configmap", "kubeadm-config",
                         what="reading kubeadm-config from the initialised control plane",
                         deadline_s=ctx.lab.timeouts.kubeadm)
    except LabError as exc:
        raise LabError(f"{host.name}: the control plane was initialised by an earlier `lab up` ({INIT_MARK}) and "
                       f"its API server does not answer: {exc.message}",
                       hint=f"lab up never resets an initialised control plane: see `lab logs` and "
                            f"`lab ssh {host.name}`; to start the lab over, `lab down` then `lab up`") from exc
