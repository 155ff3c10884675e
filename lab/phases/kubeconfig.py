"""kubeconfig: admin.conf from the control plane, server rewritten to the control-plane IP the host reaches,
written to .lab/<name>/kubeconfig with mode 0600."""
from __future__ import annotations

from typing import TYPE_CHECKING

from lab.kubeconfig import fetch_kubeconfig
from lab.phase import Phase, skip_without_kubernetes
from lab.state import write_private

if TYPE_CHECKING:
    from lab.phase import Context


class Kubeconfig(Phase):
    name = "kubeconfig"

    def skip_reason(self, ctx: "Context") -> str | None:
        return skip_without_kubernetes(ctx)

    def done(self, ctx: "Context") -> bool:
        path = ctx.state.kubeconfig
        return path.exists() and (path.stat().st_mode & 0o777) == 0o600 and path.read_text() == fetch_kubeconfig(ctx)

    def run(self, ctx: "Context") -> None:
        write_private(ctx.state.kubeconfig, fetch_kubeconfig(ctx))
        ctx.log.info(f"kubeconfig: {ctx.state.kubeconfig} (export KUBECONFIG={ctx.state.kubeconfig.resolve()})")
