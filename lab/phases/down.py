"""Down: remove exactly what this lab owns (found by ownership metadata and the lab's own names), in reverse."""
from __future__ import annotations

from lab.phase import Context, Phase


class Domains(Phase):
    name = "domains"

    def run(self, ctx: Context) -> None:
        for name in ctx.hv.owned_domains(ctx.lab.name):
            ctx.hv.remove_domain(name)
            ctx.log.info(f"domain {name} removed")


class NetworkDown(Phase):
    name = "network"

    def run(self, ctx: Context) -> None:
        for name in ctx.hv.owned_networks(ctx.lab.name):
            ctx.hv.remove_network(name)
            ctx.log.info(f"network {name} removed")


class PoolDown(Phase):
    name = "pool"

    def run(self, ctx: Context) -> None:
        if ctx.hv.pool(ctx.lab.pool_name) is not None:
            ctx.hv.remove_pool(ctx.lab.pool_name)
            ctx.log.info(f"pool {ctx.lab.pool_name} and its volumes removed")


class StateDown(Phase):
    name = "state"

    def run(self, ctx: Context) -> None:
        ctx.close()
        if ctx.state.dir.exists():
            ctx.state.remove()
            ctx.log.info(f"state {ctx.state.dir} removed")
