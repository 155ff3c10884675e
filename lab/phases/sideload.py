"""Side-loading the offline bundle into a node (``kubernetes.source: bundle``): the bundle arrives as a read-only
virtio disk (lab.bundle.disk) mounted at /var/lib/lab/bundle; kubeadm, kubelet, kubectl and helm go into /usr/bin
with each sha256 read back on the node, the kubelet systemd unit and kubeadm drop-in as the upstream packages
install them, and every image is imported into containerd's k8s.io namespace. Nothing is pulled.

Control-plane-only images (API server, controller manager, scheduler, etcd) go to control planes only.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lab.errors import RemoteError
from lab.layout import BUNDLE_SERIAL

if TYPE_CHECKING:
    from lab.bundle.manifest import Entry, Manifest
    from lab.remote.host import Host

BIN_DIR = "/usr/bin"
MOUNT = "/var/lib/lab/bundle"
DEVICE = f"/dev/disk/by-id/virtio-{BUNDLE_SERIAL}"
MOUNT_SCRIPT = f"mountpoint -q {MOUNT} || {{ install -d -m 0755 {MOUNT} && mount -o ro {DEVICE} {MOUNT}; }}"
CTR = ("ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io")
CONTROL_PLANE_ONLY = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")

# What the kubelet/kubeadm packages install (kubernetes/release: kubelet.service, 10-kubeadm.conf): kubeadm writes
# /var/lib/kubelet/config.yaml and kubeadm-flags.env, then starts this unit.
KUBELET_SERVICE = """[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
"""
KUBEADM_DROPIN = """# Installed by lab from the offline bundle, as the kubeadm package does.
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
"""
UNIT_FILES = {"/etc/systemd/system/kubelet.service": KUBELET_SERVICE,
              "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROPIN}


def images_for(manifest: "Manifest", control_plane: bool) -> list["Entry"]:
    def wanted(e: "Entry") -> bool:
        name = e.ref.rsplit(":", 1)[0].rsplit("/", 1)[-1]
        return control_plane or name not in CONTROL_PLANE_ONLY

    return [e for e in manifest.of_kind("image") if e.preload and wanted(e)]


def node_sha256(host: "Host", path: str) -> str | None:
    res = host.run("sha256sum", path, check=False, sudo=True, timeout=300)
    return res.stdout.split()[0] if res.ok and res.stdout.strip() else None


def present_images(host: "Host") -> set[str]:
    res = host.run(*CTR, "images", "ls", "-q", check=False, sudo=True, timeout=120)
    if not res.ok:
        raise RemoteError(f"{host.name}: cannot list containerd images: {res.tail(3)}",
                          hint=f"is containerd running? `lab ssh {host.name} sudo systemctl status containerd`")
    return set(res.stdout.split())


def sideload_problems(host: "Host", manifest: "Manifest", control_plane: bool) -> list[str]:
    """What differs on the node from the bundle (empty = fully side-loaded)."""
    problems = []
    for entry in manifest.of_kind("binary"):
        path = f"{BIN_DIR}/{Path(entry.path).name}"
        if node_sha256(host, path) != entry.sha256:
            problems.append(f"{path} is missing or not the bundle's {entry.component} {entry.version}")
    for path, text in UNIT_FILES.items():
        if host.run("cat", path, check=False, sudo=True).stdout != text:
            problems.append(f"{path} is missing or differs")
    have = present_images(host)
    problems += [f"image {e.ref} is not in containerd" for e in images_for(manifest, control_plane)
                 if e.ref not in have and f"docker.io/{e.ref}" not in have]
    return problems


def mount_bundle(host: "Host", manifest: "Manifest") -> str:
    """Mount the node's bundle disk read-only (once) and check it carries this bundle; return the mount point."""
    host.run("sh", "-c", MOUNT_SCRIPT, sudo=True, timeout=120)
    carried = host.run("cat", f"{MOUNT}/bundle.json", check=False, sudo=True)
    if manifest.recipe_sha256 not in carried.stdout:
        raise RemoteError(f"{host.name}: the bundle disk holds another bundle than this checkout's "
                          f"({manifest.recipe_sha256[:12]})",
                          hint="the lab was created with an older bundle: `lab down` and `lab up`")
    return MOUNT


def on_node(host: "Host", manifest: "Manifest", entry: "Entry") -> str:
    """The path of a bundle file on the node (its bundle disk mounted)."""
    return f"{mount_bundle(host, manifest)}/{entry.path}"


def sideload(host: "Host", manifest: "Manifest", control_plane: bool, log) -> None:
    """Install the bundle's node binaries and units and import its images; each step skips what is in place."""
    mount = mount_bundle(host, manifest)
    for entry in manifest.of_kind("binary"):
        path = f"{BIN_DIR}/{Path(entry.path).name}"
        if node_sha256(host, path) == entry.sha256:
            continue
        host.run("install", "-m", "0755", f"{mount}/{entry.path}", path, sudo=True)
        got = node_sha256(host, path)
        if got != entry.sha256:
            raise RemoteError(f"{host.name}: {path} has sha256 {got} after install, the bundle says {entry.sha256}",
                              hint="the bundle disk is damaged: `lab bundle verify`, then `lab down` and `lab up`")
    for path, text in UNIT_FILES.items():
        host.run("install", "-d", "-m", "0755", str(Path(path).parent), sudo=True)
        host.put(path, text, mode=0o644)
    host.run("install", "-d", "-m", "0755", "/etc/kubernetes/manifests", "/var/lib/kubelet", sudo=True)
    host.run("systemctl", "daemon-reload", sudo=True)
    host.run("systemctl", "enable", "kubelet", sudo=True)
    have = present_images(host)
    for entry in images_for(manifest, control_plane):
        if entry.ref in have:
            continue
        log(f"{host.name}: importing {entry.ref}")
        res = host.run(*CTR, "images", "import", f"{mount}/{entry.path}", check=False, sudo=True, timeout=1800)
        if not res.ok:
            raise RemoteError(f"{host.name}: containerd refused image {entry.ref}: {res.tail(5)}",
                              hint="rebuild the bundle (`lab bundle build --force`), then `lab down` and `lab up`")
