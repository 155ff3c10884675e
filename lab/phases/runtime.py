"""runtime: containerd (SystemdCgroup, pinned sandbox image), swap off; with Kubernetes also kubeadm, kubelet and
kubectl from pkgs.k8s.io pinned to the spec's minor and held, and Helm (checksum verified) on the control plane.

With ``kubernetes.enabled: false`` nothing here touches the internet: containerd and runc come from the image
(the offline CI image ships Debian's), and the config is written from ``containerd config default``.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from typing import TYPE_CHECKING

from lab.errors import RemoteError
from lab.phase import Phase, run_on_nodes
from lab.spec import K8S_VERSION

if TYPE_CHECKING:
    from lab.phase import Context
    from lab.remote.host import Host
    from lab.spec import Lab

#: kubeadm's default pause image for Kubernetes 1.36/1.37 (kubeadm PauseVersion); containerd must use the same.
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.2"
#: Helm, from get.helm.sh, with the sha256 published next to the tarball (linux-amd64).
HELM_VERSION = "v4.3.0"
HELM_SHA256 = "86584a54def73570558f66f5111cc53dfed56689637ae32c1201205d494f54fb"
HELM_URL = f"https://get.helm.sh/helm-{HELM_VERSION}-linux-amd64.tar.gz"

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
K8S_KEYRING = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg"
K8S_SOURCES = "/etc/apt/sources.list.d/kubernetes.list"
K8S_PACKAGES = ("kubelet", "kubeadm", "kubectl")
APT = "DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q -y"

#: Emulated (TCG) Kubernetes nodes: the CPU weight of systemd's system.slice (kubelet, containerd and its shims),
#: against kubepods.slice's 79 on a 2-vCPU node. At systemd's default 100 the CI cluster's control plane gave
#: system.slice about half its CPU while the API server's own loopback clients timed out in their TLS handshakes
#: (it exits when a post-start hook times out, then every client re-lists: a restart loop) and the Cilium agent's
#: clang got 18 % of a vCPU, too little for the loader's fixed 300 s compile deadline. Set to 25 on the live node,
#: the next minute's split went from about even to kubepods 96 s, system.slice 30 s. The kubelet still gets its
#: share whenever it asks; it only stops winning against the pods it runs.
EMULATED_SYSTEM_SLICE_CPU_WEIGHT = 25

_SYSTEMD_CGROUP = re.compile(r"^(\s*)SystemdCgroup\s*=\s*(true|false)\s*$", re.M)
# containerd 1.x (config version 2): sandbox_image = "..."; containerd 2.x (version 3): sandbox = '...'
_SANDBOX = re.compile(r"""^(\s*)(sandbox_image|sandbox)\s*=\s*(["'])[^"']*\3\s*$""", re.M)


# ---------------------------------------------------------------------------------------------- pure helpers


def k8s_minor(lab: "Lab") -> str:
    match = K8S_VERSION.match(lab.kubernetes.version)
    return f"1.{match.group(1)}" if match else lab.kubernetes.version


def k8s_repo_line(lab: "Lab") -> str:
    return (f"deb [signed-by={K8S_KEYRING}] https://pkgs.k8s.io/core:/stable:/v{k8s_minor(lab)}/deb/ /\n")


def edit_containerd_config(default_text: str, sandbox_image: str = SANDBOX_IMAGE) -> str:
    """``containerd config default`` with exactly two edits: runc's SystemdCgroup = true, the pinned sandbox image.
    Raises ValueError when either setting is missing (an unknown config layout: better to stop than guess)."""
    text, n_cgroup = _SYSTEMD_CGROUP.subn(lambda m: f"{m.group(1)}SystemdCgroup = true", default_text)
    if n_cgroup != 1:
        raise ValueError(f"expected one SystemdCgroup line in the default config, found {n_cgroup}")
    text, n_sandbox = _SANDBOX.subn(lambda m: f"{m.group(1)}{m.group(2)} = {m.group(3)}{sandbox_image}{m.group(3)}",
                                    text)
    if n_sandbox != 1:
        raise ValueError(f"expected one sandbox image line in the default config, found {n_sandbox}")
    return text


def _walk(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + (key,), value
            yield from _walk(value, path + (key,))


def containerd_settings(dump_text: str) -> dict[str, object]:
    """From ``containerd config dump`` (TOML): runc's SystemdCgroup and the sandbox image, whatever the layout."""
    data = tomllib.loads(dump_text)
    found: dict[str, object] = {}
    for path, value in _walk(data):
        if path[-1] == "SystemdCgroup" and "runc" in path:
            found["SystemdCgroup"] = value
        elif path[-1] in ("sandbox_image", "sandbox") and isinstance(value, str):
            found["sandbox_image"] = value
    return found


def system_slice_weight_problem(show_output: str, want: int = EMULATED_SYSTEM_SLICE_CPU_WEIGHT) -> str | None:
    """What is wrong with ``systemctl show system.slice -p CPUWeight`` (None when it is ``want``)."""
    found = re.search(r"^CPUWeight=(.*?)\s*$", show_output, re.M)
    if not found:
        return f"cannot read system.slice's CPUWeight from {show_output.strip()!r}"
    if found.group(1) != str(want):
        return f"system.slice CPUWeight is {found.group(1) or 'unset'}, want {want} on an emulated (TCG) node"
    return None


def emulated(lab: "Lab | None") -> bool:
    """A Kubernetes lab whose nodes run under TCG."""
    return lab is not None and lab.kubernetes.enabled and lab.libvirt.accel == "tcg"


def fstab_without_swap(fstab: str) -> str:
    """/etc/fstab with every active swap entry commented out."""
    out = []
    for line in fstab.splitlines(keepends=True):
        fields = line.split()
        if fields and not fields[0].startswith("#") and len(fields) >= 3 and fields[2] == "swap":
            line = "# disabled by lab (kubelet needs swap off): " + line
        out.append(line)
    return "".join(out)


# ---------------------------------------------------------------------------------------------- verification


def verify_runtime(host: "Host", lab: "Lab | None" = None, control_plane: bool = False) -> list[str]:
    """Read the node's actual state back; return every problem (empty list = the runtime is as we want it).

    Always: containerd active and answering on its socket, runc present, ``containerd config dump`` shows
    SystemdCgroup = true and the pinned sandbox image, no active swap and none left in fstab. On an emulated (TCG)
    Kubernetes node: system.slice at its lowered CPU weight.
    With ``lab`` and kubernetes.enabled: kubeadm/kubelet/kubectl at the spec's minor and held; Helm on the
    control plane at the pinned version.
    """
    problems: list[str] = []
    run = lambda cmd, *a: host.run(cmd, *a, check=False, sudo=True, timeout=120)  # noqa: E731
    if run("systemctl", "is-active", "--quiet", "containerd").rc != 0:
        problems.append("containerd service is not active")
    if run("ctr", "--address", "/run/containerd/containerd.sock", "version").rc != 0:
        problems.append("containerd does not answer on /run/containerd/containerd.sock (ctr version failed)")
    if run("sh", "-c", "command -v runc").rc != 0:
        problems.append("runc is not installed")
    dump = run("containerd", "config", "dump")
    if dump.rc != 0:
        problems.append(f"containerd config dump failed: {dump.tail(3)}")
    else:
        try:
            settings = containerd_settings(dump.stdout)
        except tomllib.TOMLDecodeError as exc:
            settings = {}
            problems.append(f"containerd config dump is not TOML: {exc}")
        if settings.get("SystemdCgroup") is not True:
            problems.append(f"containerd runc SystemdCgroup is {settings.get('SystemdCgroup')!r}, want true")
        if settings.get("sandbox_image") != SANDBOX_IMAGE:
            problems.append(f"containerd sandbox image is {settings.get('sandbox_image')!r}, want {SANDBOX_IMAGE}")
    swaps = run("cat", "/proc/swaps")
    if len([ln for ln in swaps.stdout.splitlines()[1:] if ln.strip()]) > 0:
        problems.append("swap is active (/proc/swaps lists devices)")
    fstab = run("cat", "/etc/fstab").stdout
    if fstab != fstab_without_swap(fstab):
        problems.append("/etc/fstab still has an active swap entry")
    if emulated(lab):
        why = system_slice_weight_problem(run("systemctl", "show", "system.slice", "-p", "CPUWeight").stdout)
        if why:
            problems.append(why)
    if lab is not None and lab.kubernetes.enabled and lab.kubernetes.source == "bundle":
        from lab.bundle.build import current_bundle
        from lab.phases.sideload import sideload_problems

        problems += sideload_problems(host, current_bundle()[1], control_plane)
    elif lab is not None and lab.kubernetes.enabled:
        problems += _verify_kubernetes_packages(run, lab)
        if control_plane:
            version = run("helm", "version", "--template", "{{.Version}}").stdout.strip()
            if version != HELM_VERSION:
                problems.append(f"helm is {version or 'missing'}, want {HELM_VERSION}")
    return problems


def _verify_kubernetes_packages(run, lab: "Lab") -> list[str]:
    problems = []
    minor = k8s_minor(lab)
    fmt = "${Package} ${Version} ${db:Status-Abbrev}\n"
    out = run("dpkg-query", "-W", f"-f={fmt}", *K8S_PACKAGES).stdout
    versions = {f[0]: f[1] for f in (ln.split() for ln in out.splitlines()) if len(f) >= 3 and f[2] == "ii"}
    holds = set(run("apt-mark", "showhold").stdout.split())
    for pkg in K8S_PACKAGES:
        ver = versions.get(pkg)
        if ver is None:
            problems.append(f"{pkg} is not installed")
        elif not (ver == lab.kubernetes.version or ver.startswith(f"{lab.kubernetes.version}-")
                  or ver.startswith(f"{minor}.")):
            problems.append(f"{pkg} is {ver}, want {lab.kubernetes.version}")
        if pkg not in holds:
            problems.append(f"{pkg} is not held (apt-mark hold)")
    return problems


# ---------------------------------------------------------------------------------------------- the phase


class Runtime(Phase):
    name = "runtime"

    def done(self, ctx: "Context") -> bool:
        cp = ctx.lab.control_planes[0].name if ctx.lab.control_planes else None
        return all(not verify_runtime(ctx.host(n.name), ctx.lab, n.name == cp) for n in ctx.lab.nodes)

    def run(self, ctx: "Context") -> None:
        lab = ctx.lab
        cp = lab.control_planes[0].name if lab.control_planes else None
        hosts = {n.name: ctx.host(n.name) for n in lab.nodes}  # connect in this thread, work in many
        bundle = None
        if lab.kubernetes.enabled and lab.kubernetes.source == "bundle":
            from lab.bundle.build import current_bundle

            bundle = current_bundle()
            ctx.log.info(f"side-loading bundle {bundle[1].recipe_sha256[:12]} ({bundle[0]})")

        def prepare(name: str) -> None:
            host = hosts[name]
            swap_off(host)
            if emulated(lab):
                # persistent (a drop-in under /etc/systemd/system.control), applied at once
                host.run("systemctl", "set-property", "system.slice",
                         f"CPUWeight={EMULATED_SYSTEM_SLICE_CPU_WEIGHT}", sudo=True)
            ensure_containerd(host, lab)
            configure_containerd(host)
            if bundle is not None:
                from lab.phases.sideload import sideload

                sideload(host, bundle[1], name == cp, ctx.log.info)
            elif lab.kubernetes.enabled:
                install_kubernetes_packages(host, lab)
                if name == cp:
                    install_helm(host)
            problems = verify_runtime(host, lab, name == cp)
            if problems:
                raise RemoteError(f"{name}: runtime read back wrong:\n  - " + "\n  - ".join(problems),
                                  hint=f"inspect with `lab ssh {name}`, then run `lab up` again")
            ctx.log.info(f"{name}: containerd ready (SystemdCgroup, {SANDBOX_IMAGE}), swap off"
                         + ("" if not lab.kubernetes.enabled else
                            f", Kubernetes {lab.kubernetes.version} and images from the bundle" if bundle is not None
                            else f", kubeadm {k8s_minor(lab)} held"))

        run_on_nodes(list(hosts), prepare, ctx.cancel)


def swap_off(host: "Host") -> None:
    host.run("swapoff", "-a", sudo=True)
    fstab = host.run("cat", "/etc/fstab", check=False, sudo=True).stdout
    fixed = fstab_without_swap(fstab)
    if fixed != fstab:
        host.put("/etc/fstab", fixed, mode=0o644)


#: The first Kubernetes minor whose kubelet needs containerd 2: the kubelet's fallback for a runtime that does not
#: report its cgroup driver (containerd 1.x) is removed in 1.38 (kubernetes#134906); 1.35 was SIG Node's last
#: release supporting containerd 1.x, and 1.36-1.37 still start on it through that fallback.
CONTAINERD2_FROM_MINOR = 38
_CONTAINERD_VERSION = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")


def containerd_too_old(version_output: str, kubernetes_version: str) -> str | None:
    """Why this containerd cannot run this Kubernetes (None when it can). ``version_output``: `containerd --version`."""
    found = _CONTAINERD_VERSION.search(version_output.split(" ", 2)[-1] if version_output else "")
    if not found:
        return f"cannot read containerd's version from {version_output.strip()!r}"
    major = int(found.group(1))
    minor = int(K8S_VERSION.match(kubernetes_version).group(1)) if K8S_VERSION.match(kubernetes_version) else 0
    if major < 2 and minor >= CONTAINERD2_FROM_MINOR:
        return (f"containerd {found.group(0)} is too old for Kubernetes {kubernetes_version}: from "
                f"1.{CONTAINERD2_FROM_MINOR} the kubelet needs containerd 2.x (its containerd 1.x fallback is gone)")
    return None


def ensure_containerd(host: "Host", lab: "Lab") -> None:
    have = host.run("sh", "-c", "command -v containerd && command -v runc", check=False, sudo=True)
    if have.ok:
        if lab.kubernetes.enabled:
            why = containerd_too_old(host.run("containerd", "--version", check=False, sudo=True).stdout,
                                     lab.kubernetes.version)
            if why:
                raise RemoteError(f"{host.name}: {why}",
                                  hint="use an image with containerd 2.x (Ubuntu 24.04 ships 2.2), or Kubernetes "
                                       "1.37 on Debian 12's containerd 1.6")
        return
    if not lab.kubernetes.enabled:
        raise RemoteError(f"{host.name}: containerd or runc is missing from the image and kubernetes.enabled is "
                          "false (no package installs on the offline path)",
                          hint="use an image with containerd and runc (the offline CI image has Debian's)")
    host.run(f"{APT} update && {APT} install containerd runc", sudo=True, timeout=900)


def configure_containerd(host: "Host") -> None:
    default = host.run("containerd", "config", "default", sudo=True).stdout
    try:
        wanted = edit_containerd_config(default)
    except ValueError as exc:
        raise RemoteError(f"{host.name}: cannot edit containerd's default config: {exc}",
                          hint="report the containerd version (containerd --version) with this error") from None
    current = host.run("cat", CONTAINERD_CONFIG, check=False, sudo=True)
    if current.ok and current.stdout == wanted:
        return
    host.run("mkdir", "-p", "/etc/containerd", sudo=True)
    host.put(CONTAINERD_CONFIG, wanted, mode=0o644)
    host.run("systemctl", "enable", "containerd", sudo=True)
    host.run("systemctl", "restart", "containerd", sudo=True, timeout=120)


def install_kubernetes_packages(host: "Host", lab: "Lab") -> None:
    """pkgs.k8s.io repository for the spec's minor (Debian 12, Ubuntu 24.04), the three packages, held."""
    minor = k8s_minor(lab)
    key_url = f"https://pkgs.k8s.io/core:/stable:/v{minor}/deb/Release.key"
    host.run(f"{APT} update && {APT} install apt-transport-https ca-certificates curl gpg", sudo=True, timeout=900)
    host.run("install", "-d", "-m", "0755", "/etc/apt/keyrings", sudo=True)
    host.run(f"curl -fsSL --retry 5 {shlex.quote(key_url)} | gpg --batch --yes --dearmor -o {K8S_KEYRING}",
             sudo=True, timeout=300)
    host.put(K8S_SOURCES, k8s_repo_line(lab), mode=0o644)
    pin = "" if lab.kubernetes.version == minor else f"={lab.kubernetes.version}-*"
    pkgs = " ".join(f"{p}{pin}" for p in K8S_PACKAGES)
    host.run(f"{APT} update && {APT} install --allow-change-held-packages {pkgs}", sudo=True, timeout=900)
    host.run("apt-mark", "hold", *K8S_PACKAGES, sudo=True)
    host.run("systemctl", "enable", "kubelet", sudo=True)


def install_helm(host: "Host") -> None:
    """Helm at HELM_VERSION, refused unless the tarball's sha256 equals HELM_SHA256."""
    if host.run("helm", "version", "--template", "{{.Version}}", check=False, sudo=True).stdout.strip() \
            == HELM_VERSION:
        return
    arch = host.run("dpkg", "--print-architecture", sudo=True).stdout.strip()
    if arch != "amd64":
        raise RemoteError(f"{host.name}: Helm's checksum is pinned for linux-amd64, the node is {arch}",
                          hint="add the checksum for this architecture in lab/phases/runtime.py")
    script = (f"set -e; d=$(mktemp -d); curl -fsSL --retry 5 -o $d/helm.tgz {shlex.quote(HELM_URL)}; "
              f"echo '{HELM_SHA256}  '$d/helm.tgz | sha256sum -c -; "
              f"tar -xzf $d/helm.tgz -C $d linux-amd64/helm; install -m 0755 $d/linux-amd64/helm /usr/local/bin/helm;"
              f" rm -rf $d")
    res = host.run(script, check=False, sudo=True, timeout=600)
    if not res.ok:
        raise RemoteError(f"{host.name}: installing Helm {HELM_VERSION} failed (download or checksum):\n{res.tail()}",
                          hint="a checksum mismatch means the download is not the published Helm; do not bypass it")
