"""metallb.yaml: an IPAddressPool with the spec's addresses and an L2Advertisement naming it (pure functions)."""
from __future__ import annotations

import yaml

from lab.spec import Lab, pool_ranges

API = "metallb.io/v1beta1"
NAMESPACE = "metallb-system"


def native_manifest_url(version: str) -> str:
    """MetalLB's own install manifest (L2 mode, no FRR), pinned to the release tag."""
    tag = version if version.startswith("v") else f"v{version}"
    return f"https://raw.githubusercontent.com/metallb/metallb/{tag}/config/manifests/metallb-native.yaml"


def pool_name(lab: Lab) -> str:
    return f"{lab.name}-pool"


def l2_name(lab: Lab) -> str:
    return f"{lab.name}-l2"


def pool_addresses(lab: Lab) -> list[str]:
    """Each entry as MetalLB reads it: CIDRs unchanged, ranges normalised to FIRST-LAST without spaces."""
    out = []
    for entry in lab.metallb.addresses:
        if "/" in entry:
            out.append(entry.strip())
        else:
            first, last = pool_ranges(entry)
            out.append(f"{first}-{last}")
    return out


def metallb_documents(lab: Lab) -> list[dict]:
    labels = {"app.kubernetes.io/managed-by": "lab", "lab.name": lab.name}
    pool = {"apiVersion": API, "kind": "IPAddressPool",
            "metadata": {"name": pool_name(lab), "namespace": NAMESPACE, "labels": labels},
            "spec": {"addresses": pool_addresses(lab), "autoAssign": True}}
    l2 = {"apiVersion": API, "kind": "L2Advertisement",
          "metadata": {"name": l2_name(lab), "namespace": NAMESPACE, "labels": labels},
          "spec": {"ipAddressPools": [pool_name(lab)]}}
    return [pool, l2]


def render_metallb(lab: Lab) -> str:
    header = (f"# MetalLB {lab.metallb.version} L2 configuration for lab {lab.name}, written by lab.\n"
              "# Without the L2Advertisement nothing is announced.\n")
    return header + yaml.safe_dump_all(metallb_documents(lab), sort_keys=False, explicit_start=True)


#: MetalLB's manifest probes its controller and speakers with a 1 s timeout, 3 failures. Under TCG the worker's
#: speaker and controller missed it while the node was busy and restarted in a loop on the CI cluster ("Liveness
#: probe failed ... Client.Timeout exceeded"), each restart dropping the L2 announcement.
EMULATED_PROBES = {"livenessProbe": {"timeoutSeconds": 10, "failureThreshold": 12},
                   "readinessProbe": {"timeoutSeconds": 10}}
WORKLOADS = (("deployment", "controller"), ("daemonset", "speaker"))


def emulated_probe_patches(lab: Lab) -> list[tuple[str, str, dict]]:
    """(kind, name, strategic-merge patch) for MetalLB's workloads on an emulated (TCG) lab; none otherwise."""
    if lab.libvirt.accel != "tcg":
        return []
    return [(kind, name, {"spec": {"template": {"spec": {"containers": [
        {"name": name, **{k: dict(v) for k, v in EMULATED_PROBES.items()}}]}}}})
        for kind, name in WORKLOADS]


#: The name of MetalLB's ValidatingWebhookConfiguration in its native manifest.
WEBHOOK_CONFIGURATION = "metallb-webhook-configuration"
#: The API server's longest admission-webhook timeout (admissionregistration/v1 allows 1-30 s; unset means 10).
MAX_WEBHOOK_TIMEOUT_S = 30


def emulated_webhook_timeout_patch(lab: Lab, webhook_names: list[str]) -> list[dict]:
    """JSON-patch ops giving each of MetalLB's validating webhooks the API server's longest timeout on an emulated
    (TCG) lab; none otherwise.

    MetalLB's webhooks validate a new object against the existing ones read straight from the API server
    (controller-runtime's uncached APIReader), so each admission call is a round trip API server -> webhook ->
    API server. On the TCG CI cluster those reads took longer than the default 10 s: every apply of the
    L2Advertisement failed with "context deadline exceeded" for the whole 900 s webhook deadline.
    """
    if lab.libvirt.accel != "tcg":
        return []
    return [{"op": "add", "path": f"/webhooks/{i}/timeoutSeconds", "value": MAX_WEBHOOK_TIMEOUT_S}
            for i in range(len(webhook_names))]
