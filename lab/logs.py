"""Logs for debugging: what a failing phase saves (``save_log``, ``save_journals``) and ``lab logs``, which
collects everything needed to debug a failed run, best-effort, into one folder.

Per node: serial console, domain XML, cloud-init logs, the boot journal, kubelet and containerd journals,
dmesg, sysctls and the processes by CPU time used (who starved whom on an emulated node). With Kubernetes, per
node the tail of every pod's log, and from the first control plane the pods, nodes and events (kind's
``export logs`` gives the same). Plus the tool's own phase logs and state record. What could not be collected is
listed in INDEX.txt.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from lab.errors import LabError
from lab.layout import console_log_path
from lab.phase import Context

NODE_COMMANDS = {
    "cloud-init.log": "sudo -n cat /var/log/cloud-init.log",
    "cloud-init-output.log": "sudo -n cat /var/log/cloud-init-output.log",
    "cloud-init-status.txt": "cloud-init status --long",
    "journal.txt": "sudo -n journalctl -b --no-pager -o short-precise",
    "kubelet.txt": "sudo -n journalctl -b -u kubelet --no-pager",
    "containerd.txt": "sudo -n journalctl -b -u containerd --no-pager",
    "dmesg.txt": "sudo -n dmesg -T",
    "sysctl.txt": "sudo -n sysctl -a",
    "processes.txt": "ps -eo pid,ppid,etimes,time,pcpu,rss,args --sort=-time",
}

#: Per node, when the spec bootstraps Kubernetes: the last lines of each container's log (kubelet's own layout).
POD_LOG_COMMANDS = {
    "pod-logs.txt": ("sudo -n sh -c 'for f in /var/log/pods/*/*/*.log; do [ -e \"$f\" ] || continue; "
                     "echo \"=== $f\"; tail -n 200 \"$f\"; done'"),
}

_KUBECTL = "sudo -n kubectl --kubeconfig /etc/kubernetes/admin.conf --request-timeout=60s"
#: From the first control plane, when the spec bootstraps Kubernetes: the cluster's view.
CLUSTER_COMMANDS = {
    "nodes.txt": f"{_KUBECTL} get nodes -o wide",
    "pods.txt": f"{_KUBECTL} get pods -A -o wide",
    "events.txt": f"{_KUBECTL} get events -A --sort-by=.lastTimestamp",
}


def collect_logs(ctx: Context, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    index: list[str] = []
    for log in sorted(ctx.state.logs.glob("*.log")) if ctx.state.logs.exists() else []:
        shutil.copy2(log, out / log.name)
        index.append(f"ok      {log.name}")
    if ctx.state.exists():
        shutil.copy2(ctx.state.file, out / "state.json")
        index.append("ok      state.json")
    for node in ctx.lab.nodes:
        index += _collect_node(ctx, node.name, out / node.name, node_commands(ctx, node.name))
    (out / "INDEX.txt").write_text("\n".join(index) + "\n")
    return out


def save_log(ctx: Context, name: str, text: str) -> Path:
    ctx.state.logs.mkdir(parents=True, exist_ok=True)
    path = ctx.state.logs / name
    path.write_text(text)
    return path


def save_journals(ctx: Context, node: str) -> None:
    """kubelet and containerd journals of ``node`` into the logs dir (for `lab logs`), best effort."""
    try:
        host = ctx.host(node)
        for unit in ("kubelet", "containerd"):
            res = host.run("journalctl", "--no-pager", "-o", "short-iso", "-n", "400", "-u", unit, check=False,
                           sudo=True, timeout=60)
            save_log(ctx, f"{node}-{unit}.journal.log", res.stdout + res.stderr)
    except Exception as exc:  # noqa: BLE001 - never hide the original failure behind this one
        ctx.log.warn(f"could not collect journals from {node}: {exc}")


def node_commands(ctx: Context, node: str) -> dict[str, str]:
    """What ``lab logs`` runs on ``node``: NODE_COMMANDS, plus pod logs and (first control plane) the cluster."""
    commands = dict(NODE_COMMANDS)
    if ctx.lab.kubernetes.enabled:
        commands |= POD_LOG_COMMANDS
        if node == ctx.lab.control_planes[0].name:
            commands |= CLUSTER_COMMANDS
    return commands


def _collect_node(ctx: Context, node: str, out: Path, commands: dict[str, str]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    index = []
    console = Path(console_log_path(ctx.lab, node))
    try:
        shutil.copyfile(console, out / "serial-console.log")
        index.append(f"ok      {node}/serial-console.log")
    except OSError as exc:
        index.append(f"missing {node}/serial-console.log: {exc.strerror or exc}")
    try:
        dom = ctx.hv.domain(ctx.lab.domain_name(node))
        if dom is not None:
            (out / "domain.xml").write_text(dom.XMLDesc(0))
            index.append(f"ok      {node}/domain.xml")
        running = dom is not None and ctx.hv.domain_state(ctx.lab.domain_name(node)) == "running"
    except LabError as exc:
        index.append(f"missing {node}/domain.xml: {exc.message}")
        running = False
    if not running or not ctx.state.get_in("nodes", node, {}).get("ip"):
        index.append(f"missing {node}/(ssh logs): node not running or no address")
        return index
    try:
        host = ctx.host(node)
        host.wait_connect(15)
    except LabError as exc:
        index.append(f"missing {node}/(ssh logs): {exc.message.splitlines()[0]}")
        return index
    for name, command in commands.items():
        try:
            result = host.run("sh", "-c", command, check=False, timeout=120)
        except LabError as exc:
            index.append(f"missing {node}/{name}: {exc.message.splitlines()[0]}")
            continue
        (out / name).write_text(result.stdout + (f"\n--- stderr ---\n{result.stderr}" if result.stderr else ""))
        index.append(f"{'ok' if result.ok else f'rc={result.rc}':<7} {node}/{name}")
    return index
