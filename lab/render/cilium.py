"""cilium-values.yaml: the production Helm values (pure function of the Lab), ``cilium.values`` merged last.

MTU: Cilium's ``MTU`` value is the *underlying* (base) MTU; the agent subtracts the tunnel overhead itself to get
the pod route MTU (pkg/mtu: routeMTU = baseMTU - 50 with VXLAN/Geneve). The spec's ``cilium.mtu`` is the pod
MTU (``auto`` = network MTU - overhead), so we render ``MTU = pod MTU + overhead``: 1500 for ``auto`` on a 1500
network, and pods see a 1450 route MTU. Rendering the pod MTU itself would give pods 1400.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from lab.render.kubeadm import API_PORT, control_plane
from lab.spec import Lab, bpf_map_sizes

CHART_REPO = "https://helm.cilium.io"
CHART = "cilium"
RELEASE = "cilium"
NAMESPACE = "kube-system"


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cilium_base_mtu(lab: Lab) -> int:
    """The value for Cilium's ``MTU``: pod MTU + overlay overhead (see module docstring)."""
    return lab.pod_mtu + lab.overlay_overhead


def cilium_values(lab: Lab) -> dict[str, Any]:
    cil = lab.cilium
    values: dict[str, Any] = {
        "kubeProxyReplacement": cil.kube_proxy_replacement,
        "k8sServiceHost": str(control_plane(lab).ip),
        "k8sServicePort": API_PORT,
        "ipam": {"mode": "kubernetes"},
        "routingMode": "tunnel",
        "tunnelProtocol": cil.tunnel_protocol,
        "MTU": cilium_base_mtu(lab),
        "bpf": {"masquerade": cil.bpf_masquerade},
        "hubble": {"enabled": True, "relay": {"enabled": cil.hubble.relay}, "ui": {"enabled": cil.hubble.ui}},
        # MetalLB owns LoadBalancer addresses; Cilium's LB-IPAM would race it for every Service.
        "defaultLBServiceIPAM": "none",
        # The agents and the operator read cilium-config at start only. Without these the chart leaves them running
        # on a values change (MTU, BPF map sizes...), so `lab up` after an edit of cilium.values would report the
        # new values deployed while the datapath kept the old ones (seen on the CI cluster: MTU 1510 rendered, pods
        # still 1450). With them the chart stamps the config's checksum into both pod templates and an upgrade that
        # changes the config rolls them; the cilium phase waits for that rollout.
        "rollOutCiliumPods": True,
        # Two operator replicas want two nodes (anti-affinity); a one-node lab gets one.
        "operator": {"replicas": min(2, len(lab.nodes)), "rollOutPods": True},
    }
    sizes = bpf_map_sizes(lab)
    if sizes:
        values = deep_merge(values, {"bpf": sizes})
    if lab.kubernetes.source == "bundle":
        values = deep_merge(values, bundle_values())
    if lab.libvirt.accel == "tcg":
        values = deep_merge(values, EMULATED_VALUES)
    return deep_merge(values, cil.values)


#: Emulated (TCG) nodes run 5-10x slower: the operator's 15 s leader lease and the agent's liveness budget
#: (10 x 30 s) ended in restart loops on the CI cluster, each agent restart recompiling the datapath with clang.
#: The agent's start hooks (the clang datapath build among them) get 5 minutes by default: on the CI cluster's
#: control plane the hive cancelled clang at 6:41 into the start ("Failed to compile bpf_sock.o: signal: killed",
#: then fatal), so under TCG they get 30; the CRD wait likewise. These are command-line flags: the hive reads its
#: own timeouts before the config directory (a cilium-config key is ignored; the drift checker says "Mismatch found
#: key=hive-start-timeout actual=5m0s expectedValue=30m").
EMULATED_VALUES: dict[str, Any] = {
    "extraArgs": ["--hive-start-timeout=30m", "--crd-wait-timeout=15m"],
    # The chart gives the agent 600 s (300 x 2 s) to answer its startup probe; the probe gets the hive's 30 min.
    # One bound cannot be raised: the loader compiles bpf_sock.c, XDP and bpf_alignchecker.c under one 300 s
    # context (defaults.ExecTimeout, a Go constant), and a clang still running then is killed and the agent exits
    # ("Failed to compile bpf_alignchecker.o: signal: killed"). That is why the TCG worker is not niced and TCG
    # guests use the TSC clocksource (lab/virt/xml.py): the compile must fit in 300 s of a guest vCPU.
    "startupProbe": {"failureThreshold": 900},
    # The agent's pod (and clang, its child) weighs more than the static pods in the node's cgroups: on the CI
    # cluster's busy control plane clang got 4 % of the CPU (API server 42 %, scheduler and controller manager
    # 21 % each) and missed that deadline. 500m fits the 1-vCPU worker's allocatable with room for probe pods.
    "resources": {"requests": {"cpu": "500m"}},
    "operator": {"extraArgs": ["--leader-election-lease-duration=60s", "--leader-election-renew-deadline=40s",
                               "--leader-election-retry-period=8s"]},
    "livenessProbe": {"failureThreshold": 30},
}


#: The chart probes the operator's /healthz, one /version round trip to the API server, with a 3 s timeout that no
#: value sets (liveness 3 failures after 60 s, readiness 5). Under TCG the busy API server answered later: on the CI
#: cluster the operator restarted 13 times in 70 minutes, and a second `lab up` saw it not serving. Patched into the
#: Deployment after helm (strategic merge, idempotent; with one replica the chart allows 100 % unavailable).
OPERATOR_DEPLOYMENT = "cilium-operator"
EMULATED_OPERATOR_PROBES = {"livenessProbe": {"timeoutSeconds": 20, "failureThreshold": 6},
                            "readinessProbe": {"timeoutSeconds": 20}}


def emulated_operator_patch(lab: Lab) -> dict[str, Any] | None:
    """Strategic-merge patch of the operator Deployment's probes for an emulated (TCG) lab; None otherwise."""
    if lab.libvirt.accel != "tcg":
        return None
    return {"spec": {"template": {"spec": {"containers": [
        {"name": OPERATOR_DEPLOYMENT, **{k: dict(v) for k, v in EMULATED_OPERATOR_PROBES.items()}}]}}}}


def operator_probes_patched(deployment: dict[str, Any], lab: Lab) -> bool:
    """Whether the operator Deployment (API dict) carries the emulated probe settings (always, off TCG)."""
    if emulated_operator_patch(lab) is None:
        return True
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    operator = next((c for c in containers if c.get("name") == OPERATOR_DEPLOYMENT), {})
    return all(all((operator.get(probe) or {}).get(k) == v for k, v in want.items())
               for probe, want in EMULATED_OPERATOR_PROBES.items())


def bundle_values() -> dict[str, Any]:
    """Images imported from the offline bundle (never pulled), and no Envoy: it is C++, not built from Go
    modules, and ``envoy.enabled: false`` alone would still run the Envoy the agent image is expected to carry."""
    from lab.bundle.recipe import image_ref, load_recipe

    recipe = load_recipe()

    def image(repository: str) -> dict[str, Any]:
        repo, tag = image_ref(recipe, repository)
        return {"repository": repo, "tag": tag, "useDigest": False, "pullPolicy": "Never"}

    operator = image("quay.io/cilium/operator-generic")
    operator["repository"] = operator["repository"].removesuffix("-generic")  # the chart appends -generic
    return {"image": image("quay.io/cilium/cilium"), "operator": {"image": operator},
            "hubble": {"relay": {"image": image("quay.io/cilium/hubble-relay")}},
            "l7Proxy": False, "envoy": {"enabled": False}}


def render_cilium_values(lab: Lab) -> str:
    header = (f"# Cilium {lab.cilium.version} Helm values for lab {lab.name}, written by lab.\n"
              f"# MTU is the base (underlay) MTU: pods get MTU - {lab.overlay_overhead} = {lab.pod_mtu} "
              f"({lab.cilium.tunnel_protocol} over IPv4).\n")
    return header + yaml.safe_dump(cilium_values(lab), sort_keys=False)


def validate_cilium_values(values: dict, schema_path: Path) -> list[str]:
    """Problems of ``values`` against a chart's values.schema.json (JSON Schema draft-07), as readable lines."""
    import jsonschema  # test extra; the phase relies on helm, which checks the pinned chart's own schema

    schema = json.loads(Path(schema_path).read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
            for err in sorted(validator.iter_errors(values), key=lambda e: list(map(str, e.absolute_path)))]
