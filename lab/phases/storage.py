"""Storage: the lab's pool, the base image uploaded into it, a qcow2 overlay and a cidata seed per node.

Everything goes through libvirt streams, so a remote ``qemu+ssh://`` hypervisor works the same way, and qemu
only ever reads files inside the pool (no permission trouble with the user's cache directory).
"""
from __future__ import annotations

from lab.errors import LabError
from lab.bundle.recipe import current_recipe_hash
from lab.layout import base_volumes, bundle_volume, node_volumes
from lab.phase import Context, Phase
from lab.remote.host import new_client_key
from lab.spec import NodeSpec
from lab.state import write_private
from lab.virt import seed
from lab.virt.xml import pool_xml, volume_xml

GIB = 1024 ** 3


def ensure_client_key(ctx: Context) -> str:
    """The lab's SSH key (0600) and its public line."""
    pub_path = ctx.state.ssh_key.with_suffix(".pub")
    if not ctx.state.ssh_key.exists() or not pub_path.exists():
        private, public = new_client_key()
        write_private(ctx.state.ssh_key, private)
        write_private(pub_path, public + "\n")
    return pub_path.read_text().strip()


class Storage(Phase):
    name = "storage"

    def done(self, ctx: Context) -> bool:
        pool = ctx.hv.pool(ctx.lab.pool_name)
        if pool is None or not pool.isActive() or ctx.image is None:
            return False
        if ctx.state.get_in("created", "base_sha256") != ctx.image.sha256:
            return False  # run() refuses a changed image under existing overlays, with the fix
        pool.refresh(0)
        names = list(base_volumes(ctx.image).values())
        if ctx.lab.kubernetes.enabled and ctx.lab.kubernetes.source == "bundle":
            names.append(bundle_volume(current_recipe_hash()))
        for node in ctx.lab.nodes:
            if not ctx.state.get_in("nodes", node.name, {}).get("host_key"):
                return False
            names += node_volumes(node).values()
        return all(ctx.hv.volume(pool, n) is not None for n in names)

    def run(self, ctx: Context) -> None:
        if ctx.image is None:
            raise LabError("storage needs the image phase first", hint="run `lab up` (not a single phase)")
        pool, created = ctx.hv.ensure_pool(pool_xml(ctx.lab))
        ctx.state.set_in("created", "pool", ctx.lab.pool_name)
        ctx.log.info(f"pool {ctx.lab.pool_name} {'created' if created else 'present'} at {ctx.lab.pool_path}")
        disk = self._base(ctx, pool)
        if ctx.lab.kubernetes.enabled and ctx.lab.kubernetes.source == "bundle":
            self._bundle(ctx, pool)
        public_key = ensure_client_key(ctx)
        for node in ctx.lab.nodes:
            self._node(ctx, pool, node, disk, public_key)

    def _upload_file(self, ctx: Context, pool, name: str, path, fmt: str = "raw"):
        vol = ctx.hv.volume(pool, name)
        if vol is None:
            size = path.stat().st_size
            vol, _ = ctx.hv.ensure_volume(pool, volume_xml(name, size, fmt))
            ctx.log.info(f"uploading {path.name} ({size / 2**20:.0f} MiB) into {ctx.lab.pool_name}/{name}")
            try:
                ctx.hv.upload(vol, path)
            except BaseException:
                vol.delete(0)  # never leave a half-written base behind: the next run would trust it
                raise
        return vol

    def _bundle(self, ctx: Context, pool) -> None:
        """The offline bundle as a read-only disk for every node (see lab.bundle.disk)."""
        from lab.bundle.build import current_bundle
        from lab.bundle.disk import bundle_disk

        directory, manifest = current_bundle()
        self._upload_file(ctx, pool, bundle_volume(manifest.recipe_sha256), bundle_disk(directory))
        ctx.state.set_in("created", "bundle", manifest.recipe_sha256)

    def _base(self, ctx: Context, pool):
        names = base_volumes(ctx.image)
        recorded = ctx.state.get_in("created", "base_sha256")
        if recorded and recorded != ctx.image.sha256 and ctx.hv.volume(pool, names["disk"]) is not None:
            raise LabError(f"image {ctx.image.name} changed since this lab was created (sha256 {recorded[:12]}... "
                           f"-> {ctx.image.sha256[:12]}...); the nodes' disks are overlays on the old one",
                           hint="run `lab down` and `lab up` to rebuild the lab on the new image")
        ctx.state.set_in("created", "base_sha256", ctx.image.sha256)
        self._upload_file(ctx, pool, names["disk"], ctx.image.disk)
        if ctx.image.format == "kernel":
            self._upload_file(ctx, pool, names["kernel"], ctx.image.kernel)
            self._upload_file(ctx, pool, names["initrd"], ctx.image.initrd)
        pool.refresh(0)
        return ctx.hv.volume(pool, names["disk"])

    def _node(self, ctx: Context, pool, node: NodeSpec, base, public_key: str) -> None:
        names = node_volumes(node)
        base_capacity = base.info()[1]
        if node.disk * GIB < base_capacity:
            raise LabError(f"nodes[{ctx.lab.nodes.index(node)}].disk: {node.disk} GiB is smaller than the image "
                           f"({base_capacity / GIB:.1f} GiB)", hint="raise the node's disk size", exit_code=2)
        if ctx.hv.volume(pool, names["disk"]) is None:
            ctx.hv.ensure_volume(pool, volume_xml(names["disk"], node.disk * GIB, "qcow2",
                                                  backing=(base.path(), "qcow2")))
        record = ctx.state.get_in("nodes", node.name, {})
        seed_vol = ctx.hv.volume(pool, names["seed"])
        if seed_vol is not None and record.get("host_key"):
            return
        private, public, fingerprint = seed.generate_host_key()
        iso = seed.build_seed_iso(seed.user_data(ctx.lab, node, public_key, private, public),
                                  # a new instance-id makes cloud-init apply the new host key on an existing disk
                                  seed.meta_data(ctx.lab, node, instance_id=f"{ctx.lab.domain_name(node)}-"
                                                 f"{fingerprint.split(':', 1)[-1][:12]}"),
                                  seed.network_config(ctx.lab, node))
        if seed_vol is not None:
            seed_vol.delete(0)
        seed_vol, _ = ctx.hv.ensure_volume(pool, volume_xml(names["seed"], len(iso), "raw"))
        ctx.hv.upload(seed_vol, iso)
        ctx.state.set_in("nodes", node.name, {**record, "host_key": public, "fingerprint": fingerprint,
                                              "ip": None, "mac": ctx.lab.mac(node)})
