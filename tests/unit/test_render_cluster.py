"""Rendered cluster artifacts: kubeadm.yaml structure, Cilium values against the chart's JSON schema, MetalLB CRs
against the openAPIV3Schema of MetalLB's CRDs, and every document through kubernetes-validate for the pinned
Kubernetes version (which knows only built-in API types: kubeadm's, the kubelet's and MetalLB's are not in it)."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lab.render import render_cluster
from lab.render.cilium import cilium_values, deep_merge, validate_cilium_values
from lab.render.kubeadm import join_configuration, kubeadm_documents, kubeadm_patches
from lab.render.metallb import metallb_documents, native_manifest_url
from lab.spec import KUBERNETES_VERSION, OVERLAY_OVERHEAD_IPV4, load_lab, parse_lab

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """../shared next to the repo (CI lays it there too); LAB_SHARED_DIR overrides. Missing = failure, not skip."""
    path = Path(os.environ.get("LAB_SHARED_DIR", REPO.parent / "shared"))
    assert (path / "schemas").is_dir(), f"shared schemas not found at {path}; set LAB_SHARED_DIR"
    return path


def default_lab():
    return load_lab(REPO / "labs" / "default.yaml")


def lab_with(**changes):
    data = yaml.safe_load((REPO / "labs" / "default.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return parse_lab(data)


# ---------------------------------------------------------------------------------------------- render set


def test_render_for_default_lab_writes_all_three(tmp_path):
    files = render_cluster(default_lab())
    assert sorted(files) == ["cilium-values.yaml", "kubeadm.yaml", "metallb.yaml"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert list(yaml.safe_load_all((tmp_path / name).read_text())), name


def test_render_is_empty_without_kubernetes():
    assert render_cluster(load_lab(REPO / "labs" / "ci.yaml")) == {}


def test_render_is_deterministic():
    assert render_cluster(default_lab()) == render_cluster(default_lab())


# ---------------------------------------------------------------------------------------------- kubeadm


def test_kubeadm_documents_structure():
    lab = default_lab()
    init, cluster, kubelet = yaml.safe_load_all(render_cluster(lab)["kubeadm.yaml"])
    cp = lab.control_planes[0]
    assert [d["kind"] for d in (init, cluster, kubelet)] == ["InitConfiguration", "ClusterConfiguration",
                                                             "KubeletConfiguration"]
    assert init["apiVersion"] == cluster["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert kubelet["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
    assert init["localAPIEndpoint"] == {"advertiseAddress": str(cp.ip), "bindPort": 6443}
    assert {"name": "node-ip", "value": str(cp.ip)} in init["nodeRegistration"]["kubeletExtraArgs"]
    assert init["nodeRegistration"]["name"] == cp.name
    assert init["skipPhases"] == ["addon/kube-proxy"]
    assert cluster["networking"]["podSubnet"] == "10.244.0.0/16"
    assert cluster["networking"]["serviceSubnet"] == "10.96.0.0/12"
    assert cluster["controlPlaneEndpoint"] == f"{cp.ip}:6443"
    # Always rendered: without it kubeadm asks dl.k8s.io for stable-1 before falling back to its own version.
    assert cluster["kubernetesVersion"] == f"v{KUBERNETES_VERSION}"
    assert cluster["imageRepository"] == "registry.k8s.io"
    assert init["nodeRegistration"]["imagePullPolicy"] == "IfNotPresent"
    assert kubelet["cgroupDriver"] == "systemd"
    assert ipaddress.IPv4Address(init["localAPIEndpoint"]["advertiseAddress"]) in lab.network.cidr


def test_kube_proxy_installed_when_replacement_is_off():
    init = kubeadm_documents(lab_with(cilium__kubeProxyReplacement=False))[0]
    assert "skipPhases" not in init


def test_patch_version_is_pinned_in_cluster_configuration():
    cluster = kubeadm_documents(lab_with(kubernetes__version="1.37.1"))[1]
    assert cluster["kubernetesVersion"] == "v1.37.1"


def bundle_lab():
    return lab_with(kubernetes__source="bundle", cilium__hubble={"relay": True, "ui": False})


def test_bundle_source_never_pulls_kubeadm_images():
    init, cluster, _ = kubeadm_documents(bundle_lab())
    assert init["nodeRegistration"]["imagePullPolicy"] == "Never"
    assert cluster["kubernetesVersion"] == "v1.37.2"


def test_bundle_cilium_values_name_bundle_images_and_disable_envoy():
    from lab.bundle.recipe import load_recipe

    values = cilium_values(bundle_lab())
    refs = set(load_recipe().images)
    agent, relay, op = values["image"], values["hubble"]["relay"]["image"], values["operator"]["image"]
    assert f"{agent['repository']}:{agent['tag']}" in refs
    assert f"{relay['repository']}:{relay['tag']}" in refs
    assert f"{op['repository']}-generic:{op['tag']}" in refs  # the chart appends -generic
    assert {agent["pullPolicy"], relay["pullPolicy"], op["pullPolicy"]} == {"Never"}
    assert agent["useDigest"] is False and values["l7Proxy"] is False
    assert values["defaultLBServiceIPAM"] == "none"


def test_join_configuration_pins_worker_ip_and_carries_token():
    lab = default_lab()
    worker = lab.workers[0]
    doc = yaml.safe_load(join_configuration(lab, worker, "abcdef.0123456789abcdef", "sha256:" + "a" * 64))
    assert doc["kind"] == "JoinConfiguration"
    assert doc["discovery"]["bootstrapToken"]["apiServerEndpoint"] == f"{lab.control_planes[0].ip}:6443"
    assert doc["discovery"]["bootstrapToken"]["token"] == "abcdef.0123456789abcdef"
    assert {"name": "node-ip", "value": str(worker.ip)} in doc["nodeRegistration"]["kubeletExtraArgs"]


# ---------------------------------------------------------------------------------------------- cilium


def cilium_schema() -> Path:
    return shared_dir() / "schemas" / "cilium" / "values.schema.json"


def test_cilium_values_pass_the_chart_schema():
    values = yaml.safe_load(render_cluster(default_lab())["cilium-values.yaml"])
    assert validate_cilium_values(values, cilium_schema()) == []


def test_cilium_schema_check_can_fail():
    values = deep_merge(cilium_values(default_lab()), {"MTU": "1500", "ipam": {"mode": 3}})
    problems = validate_cilium_values(values, cilium_schema())
    assert any(p.startswith("MTU:") for p in problems) and any(p.startswith("ipam.mode:") for p in problems)


def test_cilium_production_settings():
    lab = default_lab()
    v = yaml.safe_load(render_cluster(lab)["cilium-values.yaml"])
    assert v["kubeProxyReplacement"] is True
    assert v["k8sServiceHost"] == str(lab.control_planes[0].ip) and v["k8sServicePort"] == 6443
    assert v["ipam"] == {"mode": "kubernetes"}
    assert v["bpf"]["masquerade"] is True
    assert v["hubble"]["relay"]["enabled"] is True and v["hubble"]["ui"]["enabled"] is True
    assert v["routingMode"] == "tunnel" and v["tunnelProtocol"] == "vxlan"


def test_a_values_change_rolls_the_agents_and_the_operator():
    """The agents read cilium-config at start only: the chart must roll them when an upgrade changes it (the real
    chart's checksum annotation is checked in tests/cluster/test_bundle_artifacts.py)."""
    v = yaml.safe_load(render_cluster(default_lab())["cilium-values.yaml"])
    assert v["rollOutCiliumPods"] is True and v["operator"]["rollOutPods"] is True


@pytest.mark.parametrize("proto", ["vxlan", "geneve"])
def test_cilium_mtu_is_the_base_mtu_so_pods_get_network_minus_50(proto):
    """Cilium's MTU value is the underlay MTU; the agent subtracts 50 itself (pkg/mtu). Pods then get 1450."""
    lab = lab_with(cilium__tunnelProtocol=proto)
    v = cilium_values(lab)
    assert v["MTU"] == lab.network.mtu == 1500  # the underlay, not the pod MTU
    assert lab.pod_mtu == 1450 == v["MTU"] - OVERLAY_OVERHEAD_IPV4[proto]


def test_explicit_pod_mtu_renders_base_mtu():
    lab = lab_with(cilium__mtu=1400)
    assert cilium_values(lab)["MTU"] == 1450  # pod route MTU 1400 after Cilium's 50 bytes


def test_user_values_merge_last_and_deep():
    lab = lab_with(cilium__values={"hubble": {"ui": {"enabled": False}}, "kubeProxyReplacement": False,
                                   "ipam": {"operator": {"clusterPoolIPv4PodCIDRList": ["10.0.0.0/8"]}}})
    v = cilium_values(lab)
    assert v["hubble"] == {"enabled": True, "relay": {"enabled": True}, "ui": {"enabled": False}}
    assert v["kubeProxyReplacement"] is False
    assert v["ipam"]["mode"] == "kubernetes" and v["ipam"]["operator"]["clusterPoolIPv4PodCIDRList"]


def test_geneve_1460_is_refused_with_the_arithmetic():
    from lab.errors import SpecError

    with pytest.raises(SpecError) as err:
        lab_with(cilium__tunnelProtocol="geneve", cilium__mtu=1460)
    text = str(err.value)
    assert "cilium.mtu" in text and "1450" in text and "TCP MSS" in text


def test_a_nat_map_larger_than_the_ct_maps_is_refused_naming_where_each_size_came_from():
    """Cilium's agent exits at start on it (captured: tests/fixtures/cilium/agent_log_fatal_nat_size.txt)."""
    from lab.errors import SpecError

    spec = yaml.safe_load((REPO / "labs/ci-cluster.yaml").read_text())
    spec.setdefault("cilium", {}).setdefault("values", {})["bpf"] = {"ctTcpMax": 16384, "ctAnyMax": 8192}
    with pytest.raises(SpecError) as err:
        parse_lab(spec)
    text = str(err.value)
    assert "cilium.values.bpf.natMax" in text and "1000000 (the lab's, from tuning.sysctls" in text
    assert "bpf.ctTcpMax 16384 (cilium.values) + bpf.ctAnyMax 8192 (cilium.values) = 24576" in text
    assert "at most 24576" in text
    spec["cilium"]["values"]["bpf"]["natMax"] = 24576  # the fault tier's small maps, consistent
    assert cilium_values(parse_lab(spec))["bpf"]["natMax"] == 24576
    spec["cilium"]["values"]["bpf"] = {"ctTcpMax": "big"}  # not a number: the chart's schema reports it, not this
    parse_lab(spec)


# ---------------------------------------------------------------------------------------------- metallb


def crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((shared_dir() / "schemas" / "metallb").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def test_metallb_objects_pass_their_crd_schemas():
    schemas = crd_schemas()
    docs = list(yaml.safe_load_all(render_cluster(default_lab())["metallb.yaml"]))
    assert [d["kind"] for d in docs] == ["IPAddressPool", "L2Advertisement"]
    for doc in docs:
        jsonschema.validate(doc, schemas[(doc["apiVersion"], doc["kind"])])


def test_metallb_crd_check_can_fail():
    pool = metallb_documents(default_lab())[0]
    pool["spec"]["addresses"] = "192.168.150.200-192.168.150.220"  # a string, not a list
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, crd_schemas()[(pool["apiVersion"], pool["kind"])])


def test_l2_advertisement_names_the_pool():
    pool, l2 = metallb_documents(default_lab())
    assert l2["spec"]["ipAddressPools"] == [pool["metadata"]["name"]]
    assert pool["metadata"]["namespace"] == l2["metadata"]["namespace"] == "metallb-system"
    assert pool["spec"]["addresses"] == ["192.168.150.200-192.168.150.220"]


def test_metallb_ranges_normalised_and_cidrs_kept():
    lab = lab_with(metallb__addresses=["192.168.150.224/28", " 192.168.150.200 - 192.168.150.205 "])
    assert metallb_documents(lab)[0]["spec"]["addresses"] == ["192.168.150.224/28",
                                                              "192.168.150.200-192.168.150.205"]


def test_native_manifest_is_pinned_to_the_release_tag():
    assert native_manifest_url("0.16.2").endswith("/metallb/v0.16.2/config/manifests/metallb-native.yaml")


# ---------------------------------------------------------------------------------------------- kubernetes-validate


NOT_IN_KUBERNETES_VALIDATE = {"InitConfiguration", "ClusterConfiguration", "KubeletConfiguration",
                              "IPAddressPool", "L2Advertisement"}


def test_every_rendered_document_through_kubernetes_validate():
    """Built-in kinds are validated strictly for the pinned minor; the kinds kubernetes-validate has no schema
    for must be exactly the known set (so a new built-in document cannot slip through unvalidated)."""
    version = f"{KUBERNETES_VERSION}.0"
    unknown = set()
    for name, text in render_cluster(default_lab()).items():
        if not name.endswith(".yaml") or name == "cilium-values.yaml":
            continue  # Helm values are not a Kubernetes object
        for doc in yaml.safe_load_all(text):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unknown.add(doc["kind"])
    assert unknown == NOT_IN_KUBERNETES_VALIDATE


def test_kubernetes_validate_has_the_pinned_minor():

    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}, "bogus": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ns, f"{KUBERNETES_VERSION}.0", strict=True)


def test_kubeadm_yaml_has_no_comment_only_document():
    """kubeadm splits on '---' and rejects a document without kind/apiVersion (seen with the real kubeadm
    v1.37.2: "kind and apiVersion is mandatory information"); the header comments live inside the first one."""
    text = render_cluster(default_lab())["kubeadm.yaml"]
    chunks = [c for c in text.split("---\n") if c.strip()]
    assert all("apiVersion:" in c and "kind:" in c for c in chunks), chunks[0][:200]


def test_kubeadm_deadlines_follow_the_spec():
    lab = lab_with(timeouts={"kubeadm": 1234, "join": 567})
    init = kubeadm_documents(lab)[0]
    assert init["timeouts"] == {"controlPlaneComponentHealthCheck": "1234s", "kubeletHealthCheck": "1234s",
                                "kubernetesAPICall": "600s", "etcdAPICall": "600s"}
    join = yaml.safe_load(join_configuration(lab, lab.workers[0], "abcdef.0123456789abcdef", "sha256:" + "a" * 64))
    assert join["timeouts"]["tlsBootstrap"] == "567s"


def test_emulated_labs_get_leader_election_that_survives_tcg():
    cluster = kubeadm_documents(lab_with(libvirt={"accel": "tcg"}))[1]
    args = {a["name"]: a["value"] for a in cluster["scheduler"]["extraArgs"]}
    assert args == {"leader-elect": "false"}  # one control plane: nothing to fail over to, no lease to lose
    assert cluster["controllerManager"]["extraArgs"] == cluster["scheduler"]["extraArgs"]
    assert "scheduler" not in kubeadm_documents(default_lab())[1]  # KVM/auto: kubeadm's defaults


def test_emulated_labs_get_ecdsa_certificates_cheaper_handshakes_under_tcg():
    """An RSA-2048 TLS handshake costs about twice an ECDSA P-256 one under TCG (bench/tcg-cpu-model.sh); KVM labs
    keep kubeadm's default (no field rendered)."""
    assert kubeadm_documents(lab_with(libvirt={"accel": "tcg"}))[1]["encryptionAlgorithm"] == "ECDSA-P256"
    assert "encryptionAlgorithm" not in kubeadm_documents(default_lab())[1]


def test_emulated_labs_with_several_control_planes_keep_election_with_long_leases():
    from lab.render.kubeadm import leader_election_args

    lab = lab_with(libvirt={"accel": "tcg"})
    two = lab.model_copy(update={"nodes": [*lab.nodes, lab.control_planes[0].model_copy(update={"name": "cp2"})]})
    args = {a["name"]: a["value"] for a in leader_election_args(two)}
    assert args["leader-elect-lease-duration"] == "60s" and args["leader-elect-renew-deadline"] == "40s"


def test_emulated_labs_patch_kubeadms_static_pod_probes():
    from lab.render.kubeadm import PATCHES_DIR, kubeadm_patches

    lab = lab_with(libvirt={"accel": "tcg"})
    patches = kubeadm_patches(lab)
    assert sorted(patches) == ["etcd+strategic.yaml", "kube-apiserver+strategic.yaml",
                               "kube-controller-manager+strategic.yaml", "kube-scheduler+strategic.yaml"]
    api = yaml.safe_load(patches["kube-apiserver+strategic.yaml"])["spec"]["containers"][0]
    assert api["name"] == "kube-apiserver" and api["livenessProbe"]["failureThreshold"] == 60
    assert api["readinessProbe"]["periodSeconds"] == 10
    assert kubeadm_documents(lab)[0]["patches"] == {"directory": PATCHES_DIR}
    assert kubeadm_patches(default_lab()) == {} and "patches" not in kubeadm_documents(default_lab())[0]


def test_emulated_labs_give_cilium_leases_and_liveness_fit_for_tcg():
    values = cilium_values(lab_with(libvirt={"accel": "tcg"}))
    assert "--leader-election-lease-duration=60s" in values["operator"]["extraArgs"]
    assert values["livenessProbe"] == {"failureThreshold": 30}
    assert "--hive-start-timeout=30m" in values["extraArgs"]  # clang was killed at the 5 m default in TCG
    assert values["startupProbe"]["failureThreshold"] * 2 >= 1800  # the probe allows as long as the hive
    assert values["resources"] == {"requests": {"cpu": "500m"}}  # clang outweighs the static pods (300 s bound)
    assert "resources" not in cilium_values(default_lab())
    assert "livenessProbe" not in cilium_values(default_lab())


def test_emulated_labs_give_metallb_probes_fit_for_tcg():
    """The worker's speaker and controller failed MetalLB's 1 s probes under TCG and restarted in a loop."""
    from lab.render.metallb import emulated_probe_patches

    patches = {name: patch for _, name, patch in emulated_probe_patches(lab_with(libvirt={"accel": "tcg"}))}
    assert sorted(patches) == ["controller", "speaker"]
    [speaker] = patches["speaker"]["spec"]["template"]["spec"]["containers"]
    assert speaker["name"] == "speaker" and speaker["livenessProbe"]["timeoutSeconds"] == 10
    assert speaker["resources"] == {"requests": {"cpu": "100m"}}  # Burstable: out of the besteffort slice (weight 1)
    assert emulated_probe_patches(default_lab()) == []


def test_a_patch_is_applied_only_when_the_live_container_carries_every_field():
    """The live container as the API client serialises it (camelCase, as `lab up` reads it back)."""
    from kubernetes import client

    from lab.render.metallb import emulated_probe_patches, patch_applied

    patch = next(p for _, name, p in emulated_probe_patches(lab_with(libvirt={"accel": "tcg"})) if name == "speaker")
    probe = client.V1Probe(http_get=client.V1HTTPGetAction(path="/metrics", port=7472), timeout_seconds=10,
                           failure_threshold=12, period_seconds=10)
    live = client.V1Container(name="speaker", image="quay.io/metallb/speaker:v0.16.1", liveness_probe=probe,
                              readiness_probe=client.V1Probe(timeout_seconds=10, failure_threshold=3),
                              resources=client.V1ResourceRequirements(requests={"cpu": "100m"}))
    as_read = client.ApiClient().sanitize_for_serialization(live)
    assert patch_applied(patch, as_read)
    as_read["resources"] = {}
    assert not patch_applied(patch, as_read)  # BestEffort still: the phase runs again
    as_read["resources"] = {"requests": {"cpu": "100m"}}
    as_read["livenessProbe"]["timeoutSeconds"] = 1
    assert not patch_applied(patch, as_read)


def test_the_bpf_conntrack_and_nat_maps_get_the_labs_conntrack_budget():
    """With KPR the BPF CT map is the conntrack table: on the real CI cluster Cilium sized it from memory (131072)
    while the lab claimed nf_conntrack_max 1000000, and the conformance conntrack check failed on it."""
    from lab.spec import bpf_map_sizes

    lab = default_lab()
    assert cilium_values(lab)["bpf"] == {"masquerade": lab.cilium.bpf_masquerade, "ctTcpMax": 1000000,
                                         "ctAnyMax": 500000, "natMax": 1000000}
    small = lab_with(tuning={"sysctls": {"net.netfilter.nf_conntrack_max": "262144"}})
    assert bpf_map_sizes(small)["ctTcpMax"] == 262144
    assert bpf_map_sizes(lab_with(cilium={"kubeProxyReplacement": False})) == {}


def test_emulated_labs_give_metallb_webhooks_the_longest_timeout():
    """MetalLB's webhooks read the existing objects back from the API server; under TCG that took longer than the
    default 10 s and the L2Advertisement could not be created for the whole webhook deadline."""
    from lab.render.metallb import MAX_WEBHOOK_TIMEOUT_S, emulated_webhook_timeout_patch

    names = ["bgppeersvalidationwebhook.metallb.io", "ipaddresspoolvalidationwebhook.metallb.io",
             "l2advertisementvalidationwebhook.metallb.io"]  # as `kubectl get -o jsonpath={.webhooks[*].name}`
    ops = emulated_webhook_timeout_patch(lab_with(libvirt={"accel": "tcg"}), names)
    assert ops == [{"op": "add", "path": f"/webhooks/{i}/timeoutSeconds", "value": 30} for i in range(3)]
    assert MAX_WEBHOOK_TIMEOUT_S == 30  # admissionregistration/v1's upper bound
    assert emulated_webhook_timeout_patch(default_lab(), names) == []


def test_emulated_labs_give_the_api_servers_etcd_check_30_seconds():
    """Seen on the CI cluster under TCG: /livez failed only on its etcd check (2 s) for minutes and the liveness
    probe killed a serving API server. Emulated labs raise both etcd checks; KVM labs keep the defaults."""
    cluster = kubeadm_documents(lab_with(libvirt={"accel": "tcg"}))[1]
    args = {a["name"]: a["value"] for a in cluster["apiServer"]["extraArgs"]}
    assert args == {"etcd-healthcheck-timeout": "30s", "etcd-readycheck-timeout": "30s"}
    probe = yaml.safe_load(kubeadm_patches(lab_with(libvirt={"accel": "tcg"}))["kube-apiserver+strategic.yaml"])
    liveness = probe["spec"]["containers"][0]["livenessProbe"]
    assert liveness["timeoutSeconds"] > 30  # the probe outlasts the check it waits for
    assert "extraArgs" not in kubeadm_documents(default_lab())[1]["apiServer"]


def test_emulated_api_server_liveness_leaves_out_etcd_and_control_plane_gets_cpu_weight():
    """A restart cannot make etcd faster and began the CI cluster's restart loop: the liveness probe excludes the
    etcd check (readiness keeps it). etcd and the API server request CPU near their measured use, so that a busy
    Cilium agent (500m) does not hold five times etcd's cgroup weight; the total stays inside 2 CPUs."""
    patches = {name: yaml.safe_load(text)["spec"]["containers"][0]
               for name, text in kubeadm_patches(lab_with(libvirt={"accel": "tcg"})).items()}
    api = patches["kube-apiserver+strategic.yaml"]
    assert api["livenessProbe"]["httpGet"] == {"path": "/livez?exclude=etcd"}
    assert "httpGet" not in api["readinessProbe"]
    assert api["resources"] == {"requests": {"cpu": "300m"}}
    assert patches["etcd+strategic.yaml"]["resources"] == {"requests": {"cpu": "300m"}}
    assert "resources" not in patches["kube-scheduler+strategic.yaml"]
    assert "httpGet" not in patches["etcd+strategic.yaml"]["livenessProbe"]
    # with kubeadm's own requests (controller manager 200m, scheduler 100m), the agent's and two CoreDNS (100m)
    agent = cilium_values(lab_with(libvirt={"accel": "tcg"}))["resources"]["requests"]["cpu"]
    millicpu = [int(c["resources"]["requests"]["cpu"].rstrip("m")) for c in patches.values() if "resources" in c]
    assert sum(millicpu) + 200 + 100 + int(agent.rstrip("m")) + 2 * 100 <= 1600


#: MetalLB v0.16.1 internal/speakerlist memberlistFileConfig's JSON fields: with a file mounted, every one is read.
MEMBERLIST_FILE_FIELDS = {
    "TCPTimeout", "IndirectChecks", "RetransmitMult", "SuspicionMult", "SuspicionMaxTimeoutMult", "PushPullInterval",
    "ProbeTimeout", "ProbeInterval", "DisableTcpPings", "AwarenessMaxMultiplier", "GossipNodes", "GossipInterval",
    "GossipToTheDeadTime", "GossipVerifyIncoming", "GossipVerifyOutgoing", "EnableCompression", "HandoffQueueDepth",
    "UDPBufferSize", "QueueCheckInterval"}


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text[:-1])


def test_emulated_labs_give_the_speakers_memberlist_timing_fit_for_tcg():
    """Under TCG the speakers declared each other dead after 4 s (SuspicionMult 4 x ProbeInterval 1 s, two nodes,
    no peer to confirm) and moved VIPs mid-check; the file gives 10 s, and a dead node is still found within the
    failover bound."""
    import json

    from conformance.conftest import DEFAULT_FAILOVER_SECONDS
    from lab.render.metallb import (MEMBERLIST_ANNOTATION, MEMBERLIST_LAN_DEFAULTS, emulated_memberlist_configmap,
                                    memberlist_annotation_patch)

    cm = emulated_memberlist_configmap(lab_with(libvirt={"accel": "tcg"}))
    assert (cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == \
        ("ConfigMap", "metallb-memberlist-config", "metallb-system")
    config = json.loads(cm["data"]["config.json"])
    assert set(config) == MEMBERLIST_FILE_FIELDS == set(MEMBERLIST_LAN_DEFAULTS)  # a missing field is an error
    interval, timeout = _seconds(config["ProbeInterval"]), _seconds(config["ProbeTimeout"])
    suspicion = config["SuspicionMult"] * interval  # two speakers: log10(N) < 1, no confirmations
    assert suspicion >= 10 > MEMBERLIST_LAN_DEFAULTS["SuspicionMult"] * _seconds(MEMBERLIST_LAN_DEFAULTS["ProbeInterval"])
    assert interval + timeout + suspicion < DEFAULT_FAILOVER_SECONDS
    assert {k: v for k, v in config.items() if v != MEMBERLIST_LAN_DEFAULTS[k]} == \
        {"ProbeInterval": "2s", "ProbeTimeout": "1500ms", "SuspicionMult": 5}
    patch = memberlist_annotation_patch(cm)
    checksum = patch["spec"]["template"]["metadata"]["annotations"][MEMBERLIST_ANNOTATION]
    assert len(checksum) == 64
    other = {**cm, "data": {"config.json": json.dumps({**config, "SuspicionMult": 6}, sort_keys=True)}}
    assert memberlist_annotation_patch(other) != patch  # a changed file restarts the speakers
    assert emulated_memberlist_configmap(default_lab()) is None
