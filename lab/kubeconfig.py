"""The lab's kubeconfig: the control plane's admin.conf with the server rewritten to an address the host reaches."""
from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from lab.errors import LabError
from lab.kubectl import ADMIN_CONF, cp_host
from lab.render.kubeadm import API_PORT, control_plane

if TYPE_CHECKING:
    from lab.phase import Context
    from lab.spec import Lab


def server_url(lab: "Lab") -> str:
    return f"https://{control_plane(lab).ip}:{API_PORT}"


def rewrite_server(admin_conf: str, server: str) -> str:
    """admin.conf with every cluster's server set to ``server`` (reachable from the host)."""
    data = yaml.safe_load(admin_conf)
    if not isinstance(data, dict) or not data.get("clusters"):
        raise LabError("admin.conf from the control plane has no clusters", hint="re-run `lab up`")
    for entry in data["clusters"]:
        entry["cluster"]["server"] = server
    return yaml.safe_dump(data, sort_keys=False)


def fetch_kubeconfig(ctx: "Context") -> str:
    raw = cp_host(ctx).run("cat", ADMIN_CONF, sudo=True).stdout
    return rewrite_server(raw, server_url(ctx.lab))
