"""metallb: the pinned native manifest, wait for controller, speakers and the webhook endpoint, then metallb.yaml
(IPAddressPool + L2Advertisement), retrying the admission-webhook race until timeouts.webhook."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import yaml

from lab.errors import LabError
from lab.kubeconfig import fetch_kubeconfig
from lab.kubectl import (API_BUSY, LAB_DIR, api_client, cp_host, daemonset_rolled_out, deployment_rolled_out,
                        kubectl_retrying)
from lab.phase import Phase, skip_without_kubernetes
from lab.render.metallb import (API, MEMBERLIST_ANNOTATION, MEMBERLIST_CONFIGMAP, NAMESPACE, WEBHOOK_CONFIGURATION,
                                emulated_memberlist_configmap, emulated_probe_patches, emulated_webhook_timeout_patch,
                                l2_name, memberlist_annotation_patch, memberlist_checksum, metallb_documents,
                                native_manifest_url, patch_applied, pool_addresses, pool_name, render_metallb)
from lab.wait import api_starting, matches_any, wait_for

if TYPE_CHECKING:
    from lab.phase import Context

CONFIG_PATH = f"{LAB_DIR}/metallb.yaml"
MEMBERLIST_PATH = f"{LAB_DIR}/metallb-memberlist.yaml"
WEBHOOK_SERVICE = "metallb-webhook-service"

#: Apply failures while the webhook is not serving yet (MetalLB's documented race): retried until the deadline.
WEBHOOK_NOT_READY = (r"failed calling webhook", r"no endpoints available for service", r"connection refused",
                     r"context deadline exceeded", r"x509: certificate signed by unknown authority",
                     r"the server is currently unable", r"i/o timeout", r"webhook.*not ready")
#: What applying metallb.yaml retries: the webhook race, and a busy API server.
webhook_not_ready = matches_any(API_BUSY + WEBHOOK_NOT_READY)


def endpoint_slices_ready(slices) -> tuple[bool, str]:
    """True when some EndpointSlice of the webhook Service has a ready endpoint (V1EndpointSlice items)."""
    ready = [addr for s in slices for ep in (s.endpoints or [])
             if ep.conditions is None or ep.conditions.ready is not False for addr in (ep.addresses or [])]
    return bool(ready), f"webhook endpoints ready: {', '.join(ready) or 'none'}"


def wait_metallb(ctx: "Context", kubeconfig: str, deadline_s: float, *, quiet: bool = False) -> None:
    from kubernetes import client

    api = api_client(kubeconfig)
    apps, discovery = client.AppsV1Api(api), client.DiscoveryV1Api(api)

    def probe() -> tuple[bool, str]:
        c_ok, c = deployment_rolled_out(apps.read_namespaced_deployment("controller", NAMESPACE, _request_timeout=10))
        s_ok, s = daemonset_rolled_out(apps.read_namespaced_daemon_set("speaker", NAMESPACE, _request_timeout=10))
        slices = discovery.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={WEBHOOK_SERVICE}", _request_timeout=10).items
        w_ok, w = endpoint_slices_ready(slices)
        return c_ok and s_ok and w_ok, f"{c}; {s}; {w}"

    wait_for("MetalLB controller, speakers and webhook endpoint", deadline_s, probe, interval=5,
             log=None if quiet else ctx.log.info, transient=api_starting,
             hint="`lab ssh <control-plane> sudo kubectl -n metallb-system get pods -o wide`; raise timeouts.rollout")


def pool_applied(kubeconfig: str, lab) -> bool:
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client(kubeconfig))
    group, version = API.split("/")
    pool = custom.get_namespaced_custom_object(group, version, NAMESPACE, "ipaddresspools", pool_name(lab),
                                               _request_timeout=10)
    l2 = custom.get_namespaced_custom_object(group, version, NAMESPACE, "l2advertisements", l2_name(lab),
                                             _request_timeout=10)
    return (pool["spec"].get("addresses") == pool_addresses(lab)
            and l2["spec"].get("ipAddressPools") == metallb_documents(lab)[1]["spec"]["ipAddressPools"])


def memberlist_applied(kubeconfig: str, lab) -> bool:
    """Without a memberlist file to render: always. Else the ConfigMap holds it and the speakers' pod template
    carries its checksum (they restarted with it)."""
    from kubernetes import client

    want = emulated_memberlist_configmap(lab)
    if want is None:
        return True
    api = api_client(kubeconfig)
    cm = client.CoreV1Api(api).read_namespaced_config_map(MEMBERLIST_CONFIGMAP, NAMESPACE, _request_timeout=10)
    ds = client.AppsV1Api(api).read_namespaced_daemon_set("speaker", NAMESPACE, _request_timeout=10)
    annotations = ds.spec.template.metadata.annotations or {}
    return ((cm.data or {}) == want["data"]
            and annotations.get(MEMBERLIST_ANNOTATION) == memberlist_checksum(want))


def workload_patches_missing(kubeconfig: str, lab) -> list[str]:
    """MetalLB workloads whose container lacks the emulated (TCG) probe and resource settings ([] otherwise)."""
    from kubernetes import client

    api = api_client(kubeconfig)
    apps = client.AppsV1Api(api)
    read = {"deployment": apps.read_namespaced_deployment, "daemonset": apps.read_namespaced_daemon_set}
    missing = []
    for kind, name, patch in emulated_probe_patches(lab):
        workload = api.sanitize_for_serialization(read[kind](name, NAMESPACE, _request_timeout=10))
        container = next((c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name), {})
        if not patch_applied(patch, container):
            missing.append(f"{kind}/{name}")
    return missing


EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


def announce_labels_wrong(kubeconfig: str, lab) -> list[str]:
    """Control planes whose exclusion label does not match metallb.controlPlanesAnnounce."""
    from kubernetes import client

    core = client.CoreV1Api(api_client(kubeconfig))
    wrong = []
    for cp in lab.control_planes:
        labels = core.read_node(cp.name, _request_timeout=10).metadata.labels or {}
        if (EXCLUDE_LB_LABEL in labels) == lab.metallb.control_planes_announce:
            wrong.append(cp.name)
    return wrong


def bundle_manifest(host) -> str:
    """The bundle's MetalLB native manifest on the control plane's bundle disk."""
    from lab.bundle.build import current_bundle
    from lab.phases.sideload import on_node

    manifest = current_bundle()[1]
    return on_node(host, manifest, next(e for e in manifest.of_kind("manifest") if e.component == "metallb"))


class Metallb(Phase):
    name = "metallb"

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx)

    def done(self, ctx: "Context") -> bool:
        try:
            kubeconfig = fetch_kubeconfig(ctx)
            wait_metallb(ctx, kubeconfig, 1, quiet=True)
            return (pool_applied(kubeconfig, ctx.lab) and not announce_labels_wrong(kubeconfig, ctx.lab)
                    and memberlist_applied(kubeconfig, ctx.lab) and not workload_patches_missing(kubeconfig, ctx.lab))
        except Exception:  # noqa: BLE001 - any gap means: run
            return False

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        host = cp_host(ctx)
        source = native_manifest_url(lab.metallb.version)
        if lab.kubernetes.source == "bundle":
            source = bundle_manifest(host)
        ctx.log.info(f"applying MetalLB {lab.metallb.version} native manifest ({source})")
        kubectl_retrying(ctx, host, "apply", "-f", source, what=f"applying the MetalLB manifest ({source})",
                         deadline_s=lab.timeouts.rollout)
        for kind, name, patch in emulated_probe_patches(lab):
            kubectl_retrying(ctx, host, "-n", NAMESPACE, "patch", kind, name, "--type", "strategic", "-p",
                             json.dumps(patch), what=f"giving MetalLB's {name} probes and a CPU request fit for TCG",
                             deadline_s=lab.timeouts.rollout)
        host.run("install", "-d", "-m", "0700", LAB_DIR, sudo=True)
        memberlist = emulated_memberlist_configmap(lab)
        if memberlist is not None:
            host.put(MEMBERLIST_PATH, yaml.safe_dump(memberlist, sort_keys=False), mode=0o600)
            kubectl_retrying(ctx, host, "apply", "-f", MEMBERLIST_PATH, what=f"applying the speakers' memberlist "
                             f"timing for TCG ({MEMBERLIST_CONFIGMAP})", deadline_s=lab.timeouts.rollout)
            kubectl_retrying(ctx, host, "-n", NAMESPACE, "patch", "daemonset", "speaker", "--type", "strategic",
                             "-p", json.dumps(memberlist_annotation_patch(memberlist)),
                             what="restarting the speakers with that file (its checksum on their pod template)",
                             deadline_s=lab.timeouts.rollout)
        webhooks = kubectl_retrying(
            ctx, host, "get", "validatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "-o",
            "jsonpath={.webhooks[*].name}", what=f"reading MetalLB's webhooks ({WEBHOOK_CONFIGURATION})",
            deadline_s=lab.timeouts.rollout).stdout.split()
        ops = emulated_webhook_timeout_patch(lab, webhooks)
        if ops:
            kubectl_retrying(ctx, host, "patch", "validatingwebhookconfiguration", WEBHOOK_CONFIGURATION,
                             "--type", "json", "-p", json.dumps(ops),
                             what=f"giving MetalLB's {len(ops)} webhooks the longest timeout for TCG",
                             deadline_s=lab.timeouts.rollout)
        kubeconfig = fetch_kubeconfig(ctx)
        wait_metallb(ctx, kubeconfig, lab.timeouts.rollout)
        host.put(CONFIG_PATH, render_metallb(lab), mode=0o600)
        kubectl_retrying(ctx, host, "apply", "-f", CONFIG_PATH, what="applying metallb.yaml (IPAddressPool + "
                         "L2Advertisement)", deadline_s=lab.timeouts.webhook, transient=webhook_not_ready)
        if not pool_applied(kubeconfig, lab):
            raise LabError("metallb.yaml applied but the pool read back differs", hint="`lab render` and compare")
        for node in announce_labels_wrong(kubeconfig, lab):
            label = f"{EXCLUDE_LB_LABEL}-" if lab.metallb.control_planes_announce else f"{EXCLUDE_LB_LABEL}="
            kubectl_retrying(ctx, host, "label", "--overwrite", "node", node, label,
                             what=f"setting {node}'s {EXCLUDE_LB_LABEL} label for metallb.controlPlanesAnnounce="
                                  f"{str(lab.metallb.control_planes_announce).lower()}",
                             deadline_s=lab.timeouts.rollout)
        still_wrong = announce_labels_wrong(kubeconfig, lab)
        if still_wrong:
            raise LabError(f"control planes still have the wrong {EXCLUDE_LB_LABEL} label after labelling: "
                           f"{still_wrong}", hint="`kubectl get nodes --show-labels`")
