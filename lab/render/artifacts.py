"""``lab render``: every artifact `lab up` applies, written to a folder, without libvirt, network or download.

The same builders serve `up`: network.xml from ``network_xml``, each node's domain.xml from ``domain_xml`` with
the volume paths the storage phase gives them, the seed files from ``lab.virt.seed``, the tuning files from
``lab.render.tuning`` and the cluster files from ``lab.render.render_cluster``.

The node host keys in the rendered user-data are fresh ones (``up`` makes its own at seed time and pins them):
user-data is written 0600 because it holds a private host key.
"""
from __future__ import annotations

from pathlib import Path

from lab.images import ResolvedImage, cache_dir, load_catalog, resolve_image
from lab.layout import base_volumes, bundle_volume, console_log_path, node_volumes
from lab.render import render_cluster
from lab.remote.host import new_client_key
from lab.render.tuning import modules_conf, sysctl_conf
from lab.spec import Lab
from lab.state import LabState, write_private
from lab.virt import seed
from lab.virt.accel import local_accel
from lab.virt.xml import domain_xml, network_xml, pool_xml


def planned_image(ref) -> ResolvedImage:
    """What `up` will boot, without downloading: names, format and kernel command line.

    A downloadable catalog image needs nothing on disk; a locally built one needs its manifest (`make image`);
    local files are described from the spec alone."""
    if isinstance(ref, str):
        entry = load_catalog().get(ref)
        if entry is not None and entry.kind == "download":
            return ResolvedImage(entry.name, entry.format, cache_dir() / entry.name / entry.filename,
                                 None, None, None, "")
        return resolve_image(ref)  # a local catalog image (manifest only) or an unknown name (clear error)
    data = ref.model_dump()
    if "path" in data:
        return ResolvedImage(Path(data["path"]).name, "qcow2", Path(data["path"]), None, None, None, "")
    return ResolvedImage(Path(data["rootfs"]).name, "kernel", Path(data["rootfs"]), Path(data["kernel"]),
                         Path(data["initrd"]), data["cmdline"], "")


def render_files(lab: Lab, public_key: str | None = None) -> dict[str, str]:
    """relative path -> text, for every artifact. ``public_key``: the lab's SSH key (default: the one in the
    lab's state directory if `up` made it, else a fresh one)."""
    if public_key is None:
        pub = LabState(lab.name).ssh_key.with_suffix(".pub")
        public_key = pub.read_text().strip() if pub.exists() else new_client_key()[1]
    image = planned_image(lab.image)
    virt_type, _ = local_accel(lab.libvirt.accel)
    files: dict[str, str] = {}
    net = network_xml(lab)
    if net is not None:
        files["network.xml"] = net
    files["pool.xml"] = pool_xml(lab)
    pool = Path(lab.pool_path)
    base = base_volumes(image)
    bundle = None
    if lab.kubernetes.enabled and lab.kubernetes.source == "bundle":
        from lab.bundle.recipe import current_recipe_hash

        bundle = str(pool / bundle_volume(current_recipe_hash()))
    for node in lab.nodes:
        own = node_volumes(node)
        kernel = dict(kernel=str(pool / base["kernel"]), initrd=str(pool / base["initrd"]),
                      cmdline=image.cmdline) if image.format == "kernel" else {}
        files[f"nodes/{node.name}/domain.xml"] = domain_xml(
            lab, node, virt_type=virt_type, disk_path=str(pool / own["disk"]), seed_path=str(pool / own["seed"]),
            console_log=console_log_path(lab, node), bundle_path=bundle, **kernel)
        private, public, _ = seed.generate_host_key()
        files[f"nodes/{node.name}/user-data"] = seed.user_data(lab, node, public_key, private, public)
        files[f"nodes/{node.name}/meta-data"] = seed.meta_data(lab, node)
        files[f"nodes/{node.name}/network-config"] = seed.network_config(lab, node)
        files[f"nodes/{node.name}/sysctl.conf"] = sysctl_conf(lab)
        files[f"nodes/{node.name}/modules.conf"] = modules_conf(lab)
    files.update(render_cluster(lab))
    return files


def render_to_dir(lab: Lab, out: Path) -> list[Path]:
    written = []
    for rel, text in render_files(lab).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("user-data"):
            write_private(path, text)
        else:
            path.write_text(text)
        written.append(path)
    return written
