"""Nodes: one domain per node, defined and started concurrently."""
from __future__ import annotations

from lab.errors import LabError
from lab.layout import base_volumes, bundle_volume, console_log_path, node_volumes
from lab.bundle.recipe import current_recipe_hash
from lab.phase import Context, Phase, run_on_nodes
from lab.spec import NodeSpec
from lab.virt.accel import is_local_uri
from lab.virt.taps import TAP_TX_QUEUE_LEN, interface_targets, raise_tx_queue_len, short_taps, tx_queue_len
from lab.virt.xml import domain_xml


class Nodes(Phase):
    name = "nodes"

    def done(self, ctx: Context) -> bool:
        names = [ctx.lab.domain_name(n) for n in ctx.lab.nodes]
        if not all(ctx.hv.domain_state(name) == "running" for name in names):
            return False
        return not any(short_taps(self._taps(ctx, name)) for name in names)

    @staticmethod
    def _taps(ctx: Context, name: str) -> list[str]:
        """The domain's host-side taps when this process can reach them: libvirt on this machine, in this network
        namespace (a remote hypervisor's taps are its own business)."""
        if not (is_local_uri(ctx.hv.uri) and ctx.hv.uri.startswith("qemu")):
            return []
        return interface_targets(ctx.hv.domain(name).XMLDesc(0))

    def _raise_taps(self, ctx: Context, name: str) -> None:
        for dev in self._taps(ctx, name):
            have = tx_queue_len(dev)
            if have is None:
                ctx.log.warn(f"{name}: its tap {dev} is not in this network namespace; run `lab` where libvirtd "
                             "runs (here: `ip netns exec labns`) so that its queue can be raised")
            elif have < TAP_TX_QUEUE_LEN:
                try:
                    raise_tx_queue_len(dev)
                except OSError as exc:
                    raise LabError(f"{name}: cannot raise the tx_queue_len of its tap {dev} from {have} to "
                                   f"{TAP_TX_QUEUE_LEN}: {exc}", hint="run `lab up` as root, where libvirtd runs")
                ctx.log.info(f"{name}: tap {dev} tx_queue_len {have} -> {TAP_TX_QUEUE_LEN}")

    def _xml(self, ctx: Context, node: NodeSpec) -> str:
        pool = ctx.hv.pool(ctx.lab.pool_name)
        if pool is None or ctx.image is None:
            raise LabError("nodes need the storage and image phases first", hint="run `lab up`")
        path = lambda name: ctx.hv.volume(pool, name).path()  # noqa: E731
        base, own = base_volumes(ctx.image), node_volumes(node)
        kernel = dict(kernel=path(base["kernel"]), initrd=path(base["initrd"]), cmdline=ctx.image.cmdline) \
            if ctx.image.format == "kernel" else {}
        bundle = None
        if ctx.lab.kubernetes.enabled and ctx.lab.kubernetes.source == "bundle":
            bundle = path(bundle_volume(current_recipe_hash()))
        return domain_xml(ctx.lab, node, virt_type=ctx.virt_type or "qemu", disk_path=path(own["disk"]),
                          seed_path=path(own["seed"]), console_log=console_log_path(ctx.lab, node),
                          bundle_path=bundle, **kernel)

    def _start(self, ctx: Context, node: NodeSpec) -> str:
        name = ctx.lab.domain_name(node)
        state = ctx.hv.domain_state(name)
        if state == "running":
            self._raise_taps(ctx, name)
            return f"{name} running"
        dom = ctx.hv.domain(name) or ctx.hv.define_domain(self._xml(ctx, node))
        ctx.hv.start(dom)
        self._raise_taps(ctx, name)
        why = ctx.hv.unapplied_cpu_shares(dom)
        if why:
            ctx.log.warn(f"{name}: {why}. Without them the control plane gets no host CPU priority over the "
                         "workers' vCPU threads (they matter under TCG on a host with fewer cores than the lab's "
                         "vCPUs); give libvirtd a cgroup CPU controller to enforce them")
        return f"{name} started ({ctx.virt_type}, {node.cpus} vCPU, {node.memory} MiB)"

    def run(self, ctx: Context) -> None:
        run_on_nodes([n.name for n in ctx.lab.nodes], lambda n: ctx.log.info(self._start(ctx, ctx.lab.node(n))),
                     ctx.cancel)
