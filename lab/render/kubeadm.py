"""kubeadm.yaml: InitConfiguration + ClusterConfiguration + KubeletConfiguration (pure functions of the Lab).

Also the per-worker JoinConfiguration, built at join time from a short-lived token (never written by ``render``).
kubeadm's own types (kubeadm.k8s.io/v1beta4, kubelet.config.k8s.io/v1beta1) are not in kubernetes-validate;
``kubeadm config validate --config`` checks them on the node (see lab.phases.kubeadm).
"""
from __future__ import annotations

import yaml

from lab.spec import Lab, NodeSpec

KUBEADM_API = "kubeadm.k8s.io/v1beta4"
KUBELET_API = "kubelet.config.k8s.io/v1beta1"
CRI_SOCKET = "unix:///var/run/containerd/containerd.sock"
API_PORT = 6443
#: kubeadm's key and certificate algorithm on emulated (TCG) labs; kubeadm's own default, RSA-2048, elsewhere.
TCG_ENCRYPTION_ALGORITHM = "ECDSA-P256"
#: The API server's /livez and /readyz include an etcd check: a linearizable read of `<prefix>/health` with a 2 s
#: limit (k8s.io/apiserver storagebackend.DefaultHealthcheckTimeout). On the CI cluster under TCG a busy etcd answered
#: later than that for minutes on end (/livez?verbose: "[-]etcd failed" while every other check passed), the
#: liveness probe killed a serving API server, and its restarts then failed their post-start hooks in a loop. On
#: emulated labs etcd gets 30 s (and the liveness probe leaves the check out: EMULATED_API_LIVENESS_PATH).
TCG_ETCD_CHECK_TIMEOUT = "30s"


def control_plane(lab: Lab) -> NodeSpec:
    return lab.control_planes[0]


def api_endpoint(lab: Lab) -> str:
    """host:port of the API server, as nodes and the host reach it (the control plane's pinned lab IP)."""
    return f"{control_plane(lab).ip}:{API_PORT}"


IMAGE_REPOSITORY = "registry.k8s.io"
#: On control planes: kubeadm's patches for its static pods (``kubeadm init --config`` reads them from here).
PATCHES_DIR = "/etc/lab/kubeadm-patches"
#: Emulated (TCG) nodes: probes that a 5-10x slower control plane passes. kubeadm's defaults (liveness 8 x 10 s with
#: a 15 s timeout, the API server's readiness every second) killed a healthy but starved API server over and over in
#: TCG, each restart adding load: "TLS handshake timeout", then a restart loop.
EMULATED_PROBES = {
    "livenessProbe": {"failureThreshold": 60, "timeoutSeconds": 60},
    "readinessProbe": {"periodSeconds": 10, "timeoutSeconds": 60},
}
#: The API server's liveness on emulated labs leaves out the etcd check (healthz's ``exclude``; readiness keeps
#: ``etcd-readiness``). A restart cannot make etcd answer sooner, and on the CI cluster one restart was the start of a
#: loop: every client re-lists against the new instance, whose loopback TLS handshakes then time out in its
#: post-start hooks, and it exits again.
EMULATED_API_LIVENESS_PATH = "/livez?exclude=etcd"
#: CPU requests on emulated labs (kubeadm's: API server 250m, etcd 100m). Requests set each pod's cgroup CPU weight,
#: and the Cilium agent asks for 500m (lab.render.cilium): on a saturated control plane etcd had a fifth of the
#: agent's weight. These are about the measured at-rest use (API server 35 %, etcd 25 % of a vCPU) and leave 400m of
#: the control plane's 2 CPUs unrequested (1600m with the agent and two CoreDNS) for the suite's 10m probe pods.
EMULATED_CPU_REQUESTS = {"kube-apiserver": "300m", "etcd": "300m"}
STATIC_PODS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")


def kubernetes_version(lab: Lab) -> str:
    """``v1.37.2``: always rendered. Without it kubeadm asks dl.k8s.io for ``stable-1`` and only falls back to
    its own version when that fails (cmd/kubeadm/app/util/version.go)."""
    return f"v{lab.kubernetes.version.lstrip('v')}"


def image_pull_policy(lab: Lab) -> str:
    """Never from the bundle (a missing image fails at once instead of trying a registry); else IfNotPresent."""
    return "Never" if lab.kubernetes.source == "bundle" else "IfNotPresent"


def _node_registration(lab: Lab, node: NodeSpec) -> dict:
    return {"name": node.name, "criSocket": CRI_SOCKET, "imagePullPolicy": image_pull_policy(lab),
            "kubeletExtraArgs": [{"name": "node-ip", "value": str(node.ip)}]}


def kubeadm_documents(lab: Lab) -> list[dict]:
    cp = control_plane(lab)
    init: dict = {
        "apiVersion": KUBEADM_API,
        "kind": "InitConfiguration",
        "localAPIEndpoint": {"advertiseAddress": str(cp.ip), "bindPort": API_PORT},
        "nodeRegistration": _node_registration(lab, cp),
        # kubeadm's own deadlines follow the spec's: its 4-minute default for a healthy control plane is too short
        # for an emulated (TCG) node, and a shorter one than ours would fail before our wait does.
        "timeouts": {"controlPlaneComponentHealthCheck": f"{lab.timeouts.kubeadm}s",
                     "kubeletHealthCheck": f"{lab.timeouts.kubeadm}s",
                     # kubeadm retries each API call (10 s a try) for this long; its 1 m default ran out on the
                     # CI cluster's freshly started API server ("could not bootstrap the admin user").
                     "kubernetesAPICall": f"{min(lab.timeouts.kubeadm, 600)}s",
                     "etcdAPICall": f"{min(lab.timeouts.kubeadm, 600)}s"},
    }
    if kubeadm_patches(lab):
        init["patches"] = {"directory": PATCHES_DIR}
    if lab.cilium.kube_proxy_replacement:
        init["skipPhases"] = ["addon/kube-proxy"]  # Cilium replaces kube-proxy: never install it
    cluster: dict = {
        "apiVersion": KUBEADM_API,
        "kind": "ClusterConfiguration",
        "clusterName": lab.name,
        "kubernetesVersion": kubernetes_version(lab),
        "imageRepository": IMAGE_REPOSITORY,
        "controlPlaneEndpoint": api_endpoint(lab),
        "networking": {
            "podSubnet": str(lab.kubernetes.pod_subnet),
            "serviceSubnet": str(lab.kubernetes.service_subnet),
            "dnsDomain": "cluster.local",
        },
        "apiServer": {"certSANs": [str(cp.ip), cp.name]},
    }
    if lab.libvirt.accel == "tcg":
        # Every TLS handshake signs with the serving key (and with the client's, for mutual TLS). Under TCG an RSA-2048
        # handshake costs 25-33 ms of emulated CPU and an ECDSA P-256 one 13-16 ms (bench/tcg-cpu-model.sh), and the
        # CI cluster's starting API server lost its clients to 10 s TLS handshake timeouts. kubeadm's certificates
        # (API server, etcd, kubelet, controller manager, scheduler, admin) are ECDSA P-256 on emulated labs; the
        # API server's own loopback certificate stays RSA-2048 (client-go's self-signed generator).
        cluster["encryptionAlgorithm"] = TCG_ENCRYPTION_ALGORITHM
        cluster["apiServer"]["extraArgs"] = [{"name": flag, "value": TCG_ETCD_CHECK_TIMEOUT}
                                             for flag in ("etcd-healthcheck-timeout", "etcd-readycheck-timeout")]
        cluster["controllerManager"] = {"extraArgs": leader_election_args(lab)}
        cluster["scheduler"] = {"extraArgs": leader_election_args(lab)}
    kubelet = {
        "apiVersion": KUBELET_API,
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",  # matches containerd's SystemdCgroup = true (runtime phase)
        "containerRuntimeEndpoint": CRI_SOCKET,
    }
    return [init, cluster, kubelet]


def leader_election_args(lab: Lab) -> list[dict[str, str]]:
    """Emulated (TCG) nodes run 5-10x slower: with the default 15 s lease and 10 s renew deadline the controller
    manager and scheduler lost their leases under load and exited ("leaderelection lost", seen on the CI cluster),
    and even 60 s leases were lost while the control plane was starved. With one control plane there is nobody to
    fail over to, so election is off; with several, the leases are long."""
    if len(lab.control_planes) == 1:
        return [{"name": "leader-elect", "value": "false"}]
    return [{"name": "leader-elect-lease-duration", "value": "60s"},
            {"name": "leader-elect-renew-deadline", "value": "40s"},
            {"name": "leader-elect-retry-period", "value": "8s"}]


def kubeadm_patches(lab: Lab) -> dict[str, str]:
    """File name -> strategic-merge patch for kubeadm's static pods (none unless the lab is emulated)."""
    if lab.libvirt.accel != "tcg":
        return {}
    out = {}
    for pod in STATIC_PODS:
        container = {k: dict(v) for k, v in EMULATED_PROBES.items() if pod == "kube-apiserver" or k == "livenessProbe"}
        if pod == "kube-apiserver":
            container["livenessProbe"]["httpGet"] = {"path": EMULATED_API_LIVENESS_PATH}
        if pod in EMULATED_CPU_REQUESTS:
            container["resources"] = {"requests": {"cpu": EMULATED_CPU_REQUESTS[pod]}}
        patch = {"spec": {"containers": [{"name": pod, **container}]}}
        out[f"{pod}+strategic.yaml"] = yaml.safe_dump(patch, sort_keys=False)
    return out


def dump_documents(docs: list[dict], header: str = "") -> str:
    """YAML documents with ``header`` comments inside the first one: kubeadm splits on ``---`` and rejects a
    comment-only document before it ("kind and apiVersion is mandatory")."""
    return "---\n" + header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)[len("---\n"):]


def render_kubeadm(lab: Lab) -> str:
    header = (f"# kubeadm configuration for lab {lab.name}, written by lab. Applied with:\n"
              f"#   kubeadm init --config kubeadm.yaml   (on {control_plane(lab).name})\n")
    return dump_documents(kubeadm_documents(lab), header)


def join_configuration(lab: Lab, node: NodeSpec, token: str, ca_cert_hash: str) -> str:
    """A worker's JoinConfiguration: node IP pinned like the control plane's; token from ``kubeadm token create``."""
    doc = {
        "apiVersion": KUBEADM_API,
        "kind": "JoinConfiguration",
        "discovery": {"bootstrapToken": {"apiServerEndpoint": api_endpoint(lab), "token": token,
                                         "caCertHashes": [ca_cert_hash]}},
        "nodeRegistration": _node_registration(lab, node),
        "timeouts": {"tlsBootstrap": f"{lab.timeouts.join}s", "kubeletHealthCheck": f"{lab.timeouts.join}s",
                     "discovery": f"{lab.timeouts.join}s"},
    }
    return dump_documents([doc])
