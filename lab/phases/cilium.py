"""cilium: ``helm upgrade --install`` of the pinned chart with the rendered values (checked by ``helm template``
against the chart's own values.schema.json first), then wait for the agent on every node there is and one serving
operator, and for CoreDNS on the pod network. It runs before the workers join (kubeadm's documented order, and
kind's): the operator's other replicas and Hubble relay may wait for a worker, and the ready phase waits for every
kube-system pod.

An agent is Ready before its datapath is: it compiles bpf_sock, the alignment checker and bpf_overlay under one
fixed 300 s limit, then bpf_host and the first bpf_lxc. On the CI cluster under TCG a worker joining and MetalLB
going in during that compile had it killed at the limit every 5 minutes; with the control plane alone on the
host the same compile took a third of the time. Waiting for CoreDNS keeps the control plane's compile alone."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from lab.errors import LabError, RemoteError
from lab.kubeconfig import fetch_kubeconfig
from lab.kubectl import (ADMIN_CONF, LAB_DIR, api_client, cp_host, daemonset_rolled_out, deployment_serving,
                         kubectl, kubectl_retrying, waiting_reasons)
from lab.phase import Phase, skip_without_kubernetes
from lab.render.cilium import (CHART, CHART_REPO, NAMESPACE, OPERATOR_DEPLOYMENT, RELEASE, cilium_values,
                               emulated_operator_patch, operator_probes_patched, render_cilium_values)
from lab.wait import api_starting, wait_for

if TYPE_CHECKING:
    from lab.phase import Context

VALUES_PATH = f"{LAB_DIR}/cilium-values.yaml"


def helm_args(verb: str, version: str, chart_file: str | None = None) -> list[str]:
    """helm VERB for the pinned chart: from the chart repository, or a chart archive side-loaded from the bundle."""
    chart = [chart_file] if chart_file else [CHART, "--repo", CHART_REPO, "--version", version]
    return [f"KUBECONFIG={ADMIN_CONF}", "helm", verb, RELEASE, *chart, "--namespace", NAMESPACE,
            "--values", VALUES_PATH]


def bundle_chart(host) -> str:
    """The bundle's Cilium chart on the control plane's bundle disk."""
    from lab.bundle.build import current_bundle
    from lab.phases.sideload import on_node

    manifest = current_bundle()[1]
    return on_node(host, manifest, next(e for e in manifest.of_kind("chart") if e.component == CHART))


#: kubeadm's DNS add-on: its pods are the first on the pod network, so one available replica means the agent
#: there has initialised its datapath and built its first endpoint (kubeadm's documented check that a pod network
#: works).
COREDNS = "coredns"


FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')


def agent_fatal(log: str) -> str | None:
    """The last ``level=fatal`` message of an agent's log (a start-up refusal: the agent exits and will exit again
    on every restart), None when it has none (killed by its probes, OOM: a restart may get further)."""
    found = FATAL.findall(log)
    return found[-1].replace('\\"', '"') if found else None


def crash_looping_agents(pods) -> list[tuple[str, str]]:
    """(pod, node) of the Cilium agent pods whose agent container waits in CrashLoopBackOff."""
    return [(pod.metadata.name, pod.spec.node_name or "?") for pod in pods
            if "CrashLoopBackOff" in waiting_reasons(pod, "cilium-agent")]


#: The start of Cilium's own configuration refusals (the daemon's config validation): the agent exits with it on every
#: restart. Other fatal exits can be transient under TCG (a datapath compile killed at its fixed limit, then fatal),
#: so they are reported in the wait's state, not acted on.
CONFIG_REFUSAL = "invalid daemon configuration"


def fatal_agents(ctx: "Context", pods) -> list[str]:
    """'pod on node: fatal message' for each crash-looping agent whose last run ended fatally. One that refused its
    configuration will not come up however long the rollout waits (seen on the CI cluster: a NAT map larger than
    the CT maps, both agents crash-looping for the whole 2400 s): that stops `up` at once, in the agent's words."""
    out = []
    for name, node in crash_looping_agents(pods):
        got = kubectl(cp_host(ctx), "-n", NAMESPACE, "logs", name, "-c", "cilium-agent", "--previous", "--tail=50",
                      check=False, timeout=60)
        fatal = agent_fatal(got.stdout) if got.ok else None
        if fatal and fatal.startswith(CONFIG_REFUSAL):
            raise LabError(f"the Cilium agent {name} on {node} refuses its configuration: {fatal}",
                           hint="fix cilium.values in the spec (`lab render` shows what is sent) and run `lab up` "
                                "again")
        if fatal:
            out.append(f"{name} on {node} exited: {fatal}")
    return out


def wait_rollout(ctx: "Context", kubeconfig: str, deadline_s: float) -> None:
    from kubernetes import client

    api = api_client(kubeconfig)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

    def probe() -> tuple[bool, str]:
        daemonset = apps.read_namespaced_daemon_set("cilium", NAMESPACE, _request_timeout=10)
        # only the agents of the DaemonSet's current spec: an old one that refused old values is being replaced
        current = f"k8s-app=cilium,pod-template-generation={daemonset.metadata.generation}"
        fatal = fatal_agents(ctx, core.list_namespaced_pod(NAMESPACE, label_selector=current,
                                                           _request_timeout=10).items)
        ds_ok, ds = daemonset_rolled_out(daemonset)
        op_ok, op = deployment_serving(apps.read_namespaced_deployment("cilium-operator", NAMESPACE,
                                                                       _request_timeout=10))
        dns_ok, dns = deployment_serving(apps.read_namespaced_deployment(COREDNS, "kube-system", _request_timeout=10))
        return ds_ok and op_ok and dns_ok, "; ".join([ds, op, dns, *fatal])

    wait_for("Cilium agent DaemonSet rolled out, an operator serving and CoreDNS on the pod network", deadline_s,
             probe, interval=5,
             log=ctx.log.info,
             transient=api_starting,
             hint="`lab ssh <control-plane> sudo kubectl -n kube-system get pods -o wide`; raise timeouts.rollout")


class Cilium(Phase):
    name = "cilium"

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx)

    def installed(self, ctx: "Context") -> bool:
        """The pinned chart deployed with exactly the rendered values (``helm list`` and ``helm get values``)."""
        host = cp_host(ctx)
        status = host.run("env", f"KUBECONFIG={ADMIN_CONF}", "helm", "list", "--namespace", NAMESPACE,
                          "--filter", f"^{RELEASE}$", "--output", "json", check=False, sudo=True)
        if not status.ok:
            return False
        releases = json.loads(status.stdout or "[]")
        if not releases or releases[0].get("chart") != f"{CHART}-{ctx.lab.cilium.version}" \
                or releases[0].get("status") != "deployed":
            return False
        values = host.run("env", f"KUBECONFIG={ADMIN_CONF}", "helm", "get", "values", RELEASE, "--namespace",
                          NAMESPACE, "--output", "json", check=False, sudo=True)
        return values.ok and json.loads(values.stdout or "{}") == cilium_values(ctx.lab)

    def operator_patched(self, ctx: "Context") -> bool:
        if emulated_operator_patch(ctx.lab) is None:
            return True
        got = cp_host(ctx).run("kubectl", f"--kubeconfig={ADMIN_CONF}", "-n", NAMESPACE, "get", "deployment",
                               OPERATOR_DEPLOYMENT, "-o", "json", check=False, sudo=True)
        return got.ok and operator_probes_patched(json.loads(got.stdout), ctx.lab)

    def patch_operator(self, ctx: "Context") -> None:
        """The operator's probe timeouts for TCG (render/cilium.py), unless the Deployment already has them."""
        patch = emulated_operator_patch(ctx.lab)
        if patch is None or self.operator_patched(ctx):
            return
        kubectl_retrying(ctx, cp_host(ctx), "-n", NAMESPACE, "patch", "deployment", OPERATOR_DEPLOYMENT, "--type",
                         "strategic", "-p", json.dumps(patch), what="giving the Cilium operator's probes timeouts "
                         "fit for TCG", deadline_s=ctx.lab.timeouts.rollout)

    def done(self, ctx: "Context") -> bool:
        if not self.installed(ctx) or not self.operator_patched(ctx):
            return False
        try:
            wait_rollout(ctx, fetch_kubeconfig(ctx), 1)
        except LabError:  # installed, not serving this second (an operator restarting): run() waits, no upgrade
            return False
        return True

    def recover_interrupted(self, ctx: "Context", host) -> None:
        """A `lab up` stopped during `helm upgrade` (Ctrl-C, a lost SSH session) leaves the release pending, and
        every later upgrade fails with "another operation (install/upgrade/rollback) is in progress" (seen on the
        CI cluster). With no helm process left on the node, the release is rolled back to its last deployed
        revision; the upgrade then runs as usual."""
        got = host.run("env", f"KUBECONFIG={ADMIN_CONF}", "helm", "history", RELEASE, "--namespace", NAMESPACE,
                       "--max", "20", "--output", "json", check=False, sudo=True)
        history = json.loads(got.stdout or "[]") if got.ok else []
        if not history or not str(history[-1].get("status", "")).startswith("pending-"):
            return
        last = history[-1]
        if host.run("pgrep", "-x", "helm", check=False).ok:
            raise LabError(f"release {RELEASE} is {last['status']} (revision {last['revision']}) and a helm process "
                           f"is running on {host.name}", hint="let it finish, then run `lab up` again")
        deployed = [h["revision"] for h in history if h.get("status") in ("deployed", "superseded")]
        if not deployed:
            raise LabError(f"release {RELEASE} is {last['status']} (revision {last['revision']}) with no deployed "
                           "revision to roll back to", hint=f"`lab ssh {host.name}` and `helm uninstall {RELEASE} "
                           f"-n {NAMESPACE}`, then `lab up`")
        ctx.log.warn(f"release {RELEASE} was left {last['status']} at revision {last['revision']} by an interrupted "
                     f"helm; rolling back to revision {deployed[-1]}")
        host.run("env", f"KUBECONFIG={ADMIN_CONF}", "helm", "rollback", RELEASE, str(deployed[-1]), "--namespace",
                 NAMESPACE, "--force-conflicts", sudo=True, timeout=ctx.lab.timeouts.command)

    def install(self, ctx: "Context") -> None:
        lab = ctx.lab
        host = cp_host(ctx)
        self.recover_interrupted(ctx, host)
        host.run("install", "-d", "-m", "0700", LAB_DIR, sudo=True)
        host.put(VALUES_PATH, render_cilium_values(lab), mode=0o600)
        chart_file = bundle_chart(host) if lab.kubernetes.source == "bundle" else None
        check = host.run("env", *helm_args("template", lab.cilium.version, chart_file), check=False, sudo=True,
                         timeout=lab.timeouts.command)
        if not check.ok:
            raise RemoteError(f"Cilium chart {lab.cilium.version} rejects the rendered values:\n{check.tail()}",
                              hint="check cilium.values and cilium.version in the spec; `lab render` shows the values")
        ctx.log.info(f"helm upgrade --install cilium {lab.cilium.version}")
        # Helm 4 upgrades by server-side apply. On a TCG lab this phase patched the operator's probe timeouts
        # (field manager kubectl-patch), so an upgrade with other values stopped at "Apply failed with 2
        # conflicts" (seen on the CI cluster). Forcing lets the chart take the fields back; the patch follows.
        host.run("env", *helm_args("upgrade", lab.cilium.version, chart_file), "--install", "--force-conflicts",
                 sudo=True, timeout=lab.timeouts.command)

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        if self.installed(ctx):
            ctx.log.info(f"cilium {lab.cilium.version} is installed with these values: waiting, not upgrading")
        else:
            self.install(ctx)
        self.patch_operator(ctx)
        wait_rollout(ctx, fetch_kubeconfig(ctx), lab.timeouts.rollout)
