"""Cilium's status, read from ``cilium-dbg status`` (text) or ``cilium-dbg status -o json``, and cilium-health's
node reachability: the one parser, used by the lab's ready phase and by the conformance checks. Kube-proxy
replacement, the datapath modes (masquerading, host routing, tunnel, Hubble) and a judge that names any silent
fallback to netfilter."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

KPR_LINE = re.compile(r"^\s*KubeProxyReplacement:\s+(\S+)", re.M)


def kpr_mode(status_output: str) -> str | None:
    """The reported mode ("True", "False", "Strict", ...): ``kube-proxy-replacement.mode`` of the JSON form, or the
    ``KubeProxyReplacement:`` line of the text form; None when the output has neither."""
    try:
        doc = json.loads(status_output)
    except ValueError:
        match = KPR_LINE.search(status_output or "")
        return match.group(1) if match else None
    if not isinstance(doc, dict):
        return None
    section = doc.get("kube-proxy-replacement") or {}
    return section.get("mode") if isinstance(section, dict) else None


def cilium_kpr(status_output: str) -> tuple[bool, str]:
    """(active, the reported value); the value explains itself when the output has no KPR status."""
    mode = kpr_mode(status_output)
    if mode is None:
        return False, "no KubeProxyReplacement line in cilium status"
    return mode.lower() in ("true", "strict"), mode


# ---------------------------------------------------------------------------------------------- datapath modes
#
# Field names are the JSON tags of Cilium 1.20.2's API models (api/v1/models, read in the module cache):
#   StatusResponse: "kube-proxy-replacement", "masquerading", "routing", "hubble", "cluster"
#   KubeProxyReplacement.Mode        json:"mode"                     enum True, False
#   Masquerading.Mode                json:"mode"                     enum BPF, iptables
#   Masquerading.Enabled             json:"enabled"; EnabledProtocols json:"enabledProtocols" {ipv4, ipv6}
#   Routing.IntraHostRoutingMode     json:"intra-host-routing-mode"  enum BPF, Legacy   ("Host Routing")
#   Routing.InterHostRoutingMode     json:"inter-host-routing-mode"  enum Native, Tunnel
#   Routing.TunnelProtocol           json:"tunnel-protocol"
#   HubbleStatus.State               json:"state"                    enum Ok, Warning, Failure, Disabled
# The text form is pkg/client/client.go's FormatStatusResponse: "KubeProxyReplacement:\t<mode>\t[devices]",
# "Masquerading:\tBPF\t[devs]\t<cidrs> [IPv4: Enabled, IPv6: Disabled]" (or "IPTables [...]" or "Disabled"),
# "Routing:\tNetwork: Tunnel [vxlan]\tHost: BPF", "Hubble:\tOk\tCurrent/Max Flows: ...".

MASQ_LINE = re.compile(r"^\s*Masquerading:\s+(\S+)", re.M)
ROUTING_LINE = re.compile(r"^\s*Routing:\s+Network:\s+(\S+)(?:\s+\[([^\]]*)\])?\s+Host:\s+(\S+)", re.M)
HUBBLE_LINE = re.compile(r"^\s*Hubble:\s+(\S+)", re.M)


@dataclass(frozen=True)
class DatapathModes:
    """What one agent reports; None where the output does not say."""

    kube_proxy_replacement: str | None = None  # "True" / "False"
    masquerading: str | None = None            # "BPF" / "iptables" / "Disabled"
    host_routing: str | None = None            # "BPF" / "Legacy"
    network_routing: str | None = None         # "Tunnel" / "Native"
    tunnel_protocol: str | None = None         # "vxlan" / "geneve" (lower case), None when not tunnelling
    hubble: str | None = None                  # "Ok" / "Warning" / "Failure" / "Disabled"


def _masq_from_json(masq) -> str | None:
    if not isinstance(masq, dict):
        return None
    protocols = masq.get("enabledProtocols")
    enabled = (protocols.get("ipv4") or protocols.get("ipv6")) if isinstance(protocols, dict) else masq.get("enabled")
    if not enabled:
        return "Disabled"
    mode = masq.get("mode")
    return "iptables" if str(mode).lower() == "iptables" else mode


def datapath_modes(status_output: str) -> DatapathModes:
    """The datapath modes from ``cilium-dbg status -o json`` or its text form."""
    try:
        doc = json.loads(status_output)
    except ValueError:
        return _modes_from_text(status_output or "")
    if not isinstance(doc, dict):
        return DatapathModes()
    routing = doc.get("routing") if isinstance(doc.get("routing"), dict) else {}
    hubble = doc.get("hubble") if isinstance(doc.get("hubble"), dict) else {}
    network = routing.get("inter-host-routing-mode")
    tunnel = routing.get("tunnel-protocol") if network != "Native" else None
    return DatapathModes(kube_proxy_replacement=kpr_mode(status_output),
                         masquerading=_masq_from_json(doc.get("masquerading")),
                         host_routing=routing.get("intra-host-routing-mode"), network_routing=network,
                         tunnel_protocol=tunnel.lower() if tunnel else None, hubble=hubble.get("state"))


def _modes_from_text(text: str) -> DatapathModes:
    masq = MASQ_LINE.search(text)
    routing = ROUTING_LINE.search(text)
    hubble = HUBBLE_LINE.search(text)
    masq_mode = masq.group(1) if masq else None
    if masq_mode and masq_mode.lower() == "iptables":
        masq_mode = "iptables"
    network, tunnel, host = routing.groups() if routing else (None, None, None)
    return DatapathModes(kube_proxy_replacement=kpr_mode(text), masquerading=masq_mode, host_routing=host,
                         network_routing=network, tunnel_protocol=tunnel.lower() if tunnel else None,
                         hubble=hubble.group(1) if hubble else None)


@dataclass(frozen=True)
class ExpectedDatapath:
    """What the lab asks for (lab.spec CiliumSpec): KPR, BPF masquerading, BPF host routing, the tunnel, Hubble."""

    kube_proxy_replacement: str = "True"
    masquerading: str = "BPF"
    host_routing: str = "BPF"
    tunnel_protocol: str | None = "vxlan"
    hubble: bool = True


def expected_from_spec(cilium) -> ExpectedDatapath:
    """What a lab's ``cilium`` section (lab.spec.CiliumSpec, duck-typed: this module imports only stdlib) makes the
    agents report: KPR True/False from kube_proxy_replacement, Masquerading BPF/iptables from bpf_masquerade, Host
    Routing BPF exactly when masquerading is BPF (Cilium routes through the host stack, "Legacy", when BPF
    masquerading is off), the tunnel protocol, and Hubble Ok (the lab's values always enable Hubble)."""
    return ExpectedDatapath(kube_proxy_replacement="True" if cilium.kube_proxy_replacement else "False",
                            masquerading="BPF" if cilium.bpf_masquerade else "iptables",
                            host_routing="BPF" if cilium.bpf_masquerade else "Legacy",
                            tunnel_protocol=cilium.tunnel_protocol, hubble=True)


FALLBACK_CAUSES = {
    "masquerading": "BPF masquerading needs bpf.masquerade=true and kube-proxy replacement; the agent falls back "
                    "to iptables silently when a prerequisite is missing (cilium-dbg status --verbose, agent log)",
    "host_routing": "BPF host routing falls back to Legacy (through the host netfilter stack) when BPF "
                    "masquerading is off, when enable-host-legacy-routing is set, or the kernel lacks "
                    "bpf_redirect_neigh/peer (5.10+)",
    "kube_proxy_replacement": "kubeProxyReplacement is not active: Services go through kube-proxy/netfilter",
    "tunnel_protocol": "the overlay differs from the lab spec: MTU and firewall rules assume the spec's",
    "hubble": "Hubble is not Ok: flow visibility (drop reasons) is missing",
}


def judge_datapath(modes: DatapathModes, expected: ExpectedDatapath = ExpectedDatapath(),
                   node: str = "") -> list[str]:
    """One message per mode that differs from the expectation, naming the mode as the status prints it
    ("Host Routing: Legacy", "Masquerading: iptables"); a mode the output does not report is a failure too."""
    where = f"{node}: " if node else ""
    want = {"kube_proxy_replacement": expected.kube_proxy_replacement, "masquerading": expected.masquerading,
            "host_routing": expected.host_routing, "tunnel_protocol": expected.tunnel_protocol}
    if expected.hubble:
        want["hubble"] = "Ok"
    shown = {"kube_proxy_replacement": "KubeProxyReplacement", "masquerading": "Masquerading",
             "host_routing": "Host Routing", "tunnel_protocol": "Tunnel protocol", "hubble": "Hubble"}
    problems = []
    for attr, value in want.items():
        got = getattr(modes, attr)
        if got is None and value is None:
            continue
        if got is None:
            problems.append(f"{where}{shown[attr]} not reported by cilium status (expected {value})")
        elif str(got).lower() != str(value).lower():
            problems.append(f"{where}{shown[attr]}: {got} (expected {value}): {FALLBACK_CAUSES[attr]}")
    return problems


# ---------------------------------------------------------------------------------------------- cilium-health
#
# `cilium-health status -o json` (and the health part of `cilium-dbg status --all-health`) is a
# HealthStatusResponse (api/v1/health/models, Cilium 1.20.2): {"local": {"name"}, "nodes": [NodeStatus],
# "probeInterval", "timestamp"}; NodeStatus {"name", "host": HostStatus, "health-endpoint": EndpointStatus};
# Host/EndpointStatus {"primary-address": PathStatus, "secondary-addresses": [PathStatus]};
# PathStatus {"ip", "icmp": ConnectivityStatus, "http": ConnectivityStatus}; ConnectivityStatus {"status",
# "latency", "lastProbed"}. pkg/health/client: a nil ConnectivityStatus is "unknown" (never probed), an empty
# "status" is reachable, any other text is the failure.

HEALTH_TEXT = re.compile(r"^\s*Cluster health:\s+(\d+)/(\d+) reachable", re.M)


def _path_problems(path, what: str) -> list[str]:
    if not isinstance(path, dict):
        return [f"{what}: no address probed"]
    out = []
    for proto in ("icmp", "http"):
        conn = path.get(proto)
        ip = path.get("ip", "?")
        if not isinstance(conn, dict):
            out.append(f"{what} {ip} {proto.upper()}: unknown (never probed)")
        elif conn.get("status"):
            out.append(f"{what} {ip} {proto.upper()}: {conn['status']}")
    return out


def health_problems(health_output: str) -> tuple[int, list[str]]:
    """(nodes seen, one message per unreachable or unprobed path) from cilium-health's JSON; the text form only
    gives counts, so a text "N/M reachable" with N < M yields one message saying how many."""
    try:
        doc = json.loads(health_output)
    except ValueError:
        match = HEALTH_TEXT.search(health_output or "")
        if not match:
            return 0, ["no 'Cluster health:' line and no JSON in the cilium-health output"]
        ok, total = int(match.group(1)), int(match.group(2))
        return total, [] if ok == total else [f"cilium-health: only {ok}/{total} nodes reachable"]
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, list):
        return 0, ["cilium-health JSON has no 'nodes' list"]
    problems = []
    for node in nodes:
        name = node.get("name", "?")
        host = node.get("host") or {}
        endpoint = node.get("health-endpoint") or {}
        for what, status in ((f"{name} node", host), (f"{name} health endpoint", endpoint)):
            paths = [status.get("primary-address")] + list(status.get("secondary-addresses") or [])
            for path in paths:
                problems += _path_problems(path, what)
    return len(nodes), problems


def judge_health(health_output: str, expected_nodes: list[str]) -> list[str]:
    """cilium-health must see every expected node, each reachable on every path (ICMP and HTTP, node and
    health endpoint)."""
    seen, problems = health_problems(health_output)
    try:
        names = {n.get("name") for n in json.loads(health_output).get("nodes") or []}
    except (ValueError, AttributeError):
        names = None
    if names is not None:
        # cilium-health may prefix a node name with its cluster ("default/w1"): compare the last part
        short = {str(n).rsplit("/", 1)[-1] for n in names}
        missing = sorted(set(expected_nodes) - short)
        if missing:
            problems.append(f"cilium-health does not list node(s) {', '.join(missing)}")
    elif seen < len(expected_nodes):
        problems.append(f"cilium-health lists {seen} node(s), the cluster has {len(expected_nodes)}")
    return problems
