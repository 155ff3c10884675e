"""metallb.yaml: an IPAddressPool with the spec's addresses and an L2Advertisement naming it (pure functions)."""
from __future__ import annotations

import json

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
#: MetalLB's manifest gives its pods no resources, so they are BestEffort: in the lab's guests (cgroup v2) the whole
#: besteffort slice has cpu.weight 1 against the burstable slice's 32, where the suite's probe pods run. On the TCG
#: CI cluster under the suite the speakers went unanswered for over 10 s at a time and declared each other dead; a
#: CPU request makes them Burstable, with a weight of their own.
EMULATED_RESOURCES = {"resources": {"requests": {"cpu": "100m"}}}
WORKLOADS = (("deployment", "controller"), ("daemonset", "speaker"))


def emulated_probe_patches(lab: Lab) -> list[tuple[str, str, dict]]:
    """(kind, name, strategic-merge patch) for MetalLB's workloads on an emulated (TCG) lab; none otherwise."""
    if lab.libvirt.accel != "tcg":
        return []
    return [(kind, name, {"spec": {"template": {"spec": {"containers": [
        {"name": name, **{k: dict(v) for k, v in EMULATED_PROBES.items()},
         "resources": {"requests": dict(EMULATED_RESOURCES["resources"]["requests"])}}]}}}})
        for kind, name in WORKLOADS]


def patch_applied(patch: dict, container: dict) -> bool:
    """Whether a live container (as the API returns it, camelCase dict) carries every field the patch sets."""
    def holds(want, got) -> bool:
        if isinstance(want, dict):
            return isinstance(got, dict) and all(holds(v, got.get(k)) for k, v in want.items())
        return want == got
    [wanted] = patch["spec"]["template"]["spec"]["containers"]
    return all(holds(v, container.get(k)) for k, v in wanted.items() if k != "name")


#: The ConfigMap MetalLB's speaker mounts (optional) at /etc/metallb/memberlist; it reads config.json there once, at
#: start-up, and then every field must be present (MetalLB v0.16 internal/speakerlist: memberlistFileConfig).
MEMBERLIST_CONFIGMAP = "metallb-memberlist-config"
#: hashicorp/memberlist v0.5.1 DefaultLANConfig (config.go; the version MetalLB v0.16.1 pins): what the speakers run
#: with when no file is mounted.
MEMBERLIST_LAN_DEFAULTS = {
    "TCPTimeout": "10s", "IndirectChecks": 3, "RetransmitMult": 4, "SuspicionMult": 4, "SuspicionMaxTimeoutMult": 6,
    "PushPullInterval": "30s", "ProbeTimeout": "500ms", "ProbeInterval": "1s", "DisableTcpPings": False,
    "AwarenessMaxMultiplier": 8, "GossipNodes": 3, "GossipInterval": "200ms", "GossipToTheDeadTime": "30s",
    "GossipVerifyIncoming": True, "GossipVerifyOutgoing": True, "EnableCompression": True,
    "HandoffQueueDepth": 1024, "UDPBufferSize": 1400, "QueueCheckInterval": "30s"}
#: Under TCG the speakers missed each other's 500 ms probes and 1 s TCP pings whenever a node was saturated, and
#: with two nodes (no peer to confirm) a suspect is declared dead after SuspicionMult x ProbeInterval = 4 s: on the
#: CI cluster under the suite each marked the other failed, took over its VIPs, then withdrew them ("notOwner")
#: when it came back, so a VIP's announcer moved mid-check. These give a stalled speaker 10 s (5 x 2 s) to answer
#: before it is declared dead: a node really gone is still detected in about 14 s (one probe round, its timeout,
#: the suspicion), well within the failover bound of 30 s.
EMULATED_MEMBERLIST = {"ProbeInterval": "2s", "ProbeTimeout": "1500ms", "SuspicionMult": 5}


def emulated_memberlist_configmap(lab: Lab) -> dict | None:
    """The speakers' memberlist timing on an emulated (TCG) lab, as the ConfigMap MetalLB mounts; None otherwise
    (MetalLB's own LAN defaults)."""
    if lab.libvirt.accel != "tcg":
        return None
    config = {**MEMBERLIST_LAN_DEFAULTS, **EMULATED_MEMBERLIST}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": MEMBERLIST_CONFIGMAP, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/managed-by": "lab", "lab.name": lab.name}},
            "data": {"config.json": json.dumps(config, sort_keys=True)}}


#: The speaker pod template's annotation carrying the memberlist file's checksum: changing the file changes the
#: template, so the speakers restart and read it (they read it only at start-up); `lab up` compares it to be done.
MEMBERLIST_ANNOTATION = "kvmlab.io/memberlist-config-sha256"


def memberlist_checksum(configmap: dict) -> str:
    import hashlib
    return hashlib.sha256(configmap["data"]["config.json"].encode()).hexdigest()


def memberlist_annotation_patch(configmap: dict) -> dict:
    """Strategic-merge patch for the speaker DaemonSet: the checksum annotation on its pod template."""
    return {"spec": {"template": {"metadata": {"annotations": {MEMBERLIST_ANNOTATION:
                                                               memberlist_checksum(configmap)}}}}}


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
