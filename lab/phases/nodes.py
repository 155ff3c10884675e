"""Nodes: one domain per node, defined and started concurrently."""
from __future__ import annotations

from lab.errors import LabError
from lab.layout import base_volumes, bundle_volume, console_log_path, node_volumes
from lab.bundle.recipe import current_recipe_hash
from lab.phase import Context, Phase, run_on_nodes
from lab.spec import NodeSpec
from lab.virt.xml import domain_xml


class Nodes(Phase):
    name = "nodes"

    def done(self, ctx: Context) -> bool:
        return all(ctx.hv.domain_state(ctx.lab.domain_name(n)) == "running" for n in ctx.lab.nodes)

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
            return f"{name} running"
        dom = ctx.hv.domain(name) or ctx.hv.define_domain(self._xml(ctx, node))
        ctx.hv.start(dom)
        why = ctx.hv.unapplied_cpu_shares(dom)
        if why:
            ctx.log.warn(f"{name}: {why}. Without them the control plane gets no host CPU priority over the "
                         "workers' vCPU threads (they matter under TCG on a host with fewer cores than the lab's "
                         "vCPUs); give libvirtd a cgroup CPU controller to enforce them")
        return f"{name} started ({ctx.virt_type}, {node.cpus} vCPU, {node.memory} MiB)"

    def run(self, ctx: Context) -> None:
        run_on_nodes([n.name for n in ctx.lab.nodes], lambda n: ctx.log.info(self._start(ctx, ctx.lab.node(n))),
                     ctx.cancel)
