"""Network: the lab's libvirt network (nat/isolated) with a DHCP reservation per node."""
from __future__ import annotations

from lab.phase import Context, Phase
from lab.virt.xml import network_xml


class Network(Phase):
    name = "network"

    def skip_reason(self, ctx: Context) -> str | None:
        if ctx.lab.network.mode == "bridge":
            return f"mode bridge: nodes attach to the existing host bridge {ctx.lab.bridge_name}"
        return None

    def done(self, ctx: Context) -> bool:
        net = ctx.hv.network(ctx.lab.network_name)
        if net is None or not net.isActive():
            return False
        xml = net.XMLDesc(0)
        return all(ctx.lab.mac(n) in xml and str(n.ip) in xml for n in ctx.lab.nodes)

    def run(self, ctx: Context) -> None:
        net, created = ctx.hv.ensure_network(network_xml(ctx.lab))
        for node in ctx.lab.nodes:  # reservations added live, without restarting the network
            ctx.hv.ensure_dhcp_host(net, ctx.lab.mac(node), str(node.ip), node.name)
        ctx.state.set_in("created", "network", ctx.lab.network_name)
        ctx.log.info(f"network {ctx.lab.network_name} {'created' if created else 'present'} "
                     f"({ctx.lab.network.cidr}, bridge {ctx.lab.bridge_name}, mtu {ctx.lab.network.mtu})")
