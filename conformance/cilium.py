"""Cilium's side of the suite: the enforcement barrier, Hubble drop reasons and the BPF conntrack map.

Everything is read from the agents themselves (``kubectl exec`` into the ``cilium-agent`` container of each
``k8s-app=cilium`` pod in kube-system) through ``Session.exec``; every command's exit code is checked and a failed
read is :class:`~conformance.judge.NotMeasured` with the agent's message, never a verdict.

- **Barrier**: ``cilium-dbg policy get -o json`` prints the agent's policy repository ``{"revision": N, ...}``.
  Each NetworkPolicy add or delete the agent imports bumps the revision by one (pkg/policy/repository.go), so
  after ``changes`` objects changed every agent must reach ``before + changes``; then
  ``cilium-dbg policy wait REV`` blocks until every endpoint on that node has realized that revision.
- **Drops**: ``hubble observe --verdict DROPPED --since T -o json`` in each agent (the agent image ships the
  ``hubble`` CLI; it talks to the local Hubble server), used only where the lab enabled Hubble relay.
- **Conntrack and NAT**: ``cilium-dbg bpf ct list global`` / ``cilium-dbg bpf nat list`` (entries) and
  ``cilium-dbg status --verbose`` (map sizes).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from conformance.check import BarrierResult, Drop, NoBarrier
from conformance.judge import NotMeasured

AGENT_NS, AGENT_SELECTOR, AGENT_CONTAINER = "kube-system", "k8s-app=cilium", "cilium-agent"
RELAY_SELECTOR = "k8s-app=hubble-relay"

def map_read_script(list_command: str, size_row: str, dport: int | None = None, whole_too: bool = False) -> str:
    """A shell script for the agent printing 'ENTRIES MAX' of one BPF map: the TCP lines ``list_command`` prints
    (with ``dport``: those whose destination port is ``dport``, "TCP OUT a:p -> b:DPORT ...") and the size of the
    ``size_row`` row of `cilium-dbg status --verbose` (its BPF Maps table). ``whole_too`` (with ``dport``): one
    listing, two lines: every TCP entry's count first, then the port's. Each step's exit code is checked (no
    2>/dev/null | grep -c): a failed read is an error, never "0 entries"."""
    match = f"^TCP [A-Z]+ [^ ]+ -> [^ ]+:{int(dport)} " if dport is not None else "^TCP"
    count = f"n=$(printf '%s\\n' \"$list\" | grep -cE '{match}' || true); "
    if whole_too:
        count = "a=$(printf '%s\\n' \"$list\" | grep -cE '^TCP' || true); " + count
    return (
        f"set -u; list=$({list_command}) || {{ echo '{list_command} failed' >&2; exit 3; }}; "
        "status=$(cilium-dbg status --verbose) || { echo 'cilium-dbg status --verbose failed' >&2; exit 4; }; "
        + count +
        f"m=$(printf '%s\\n' \"$status\" | sed -n 's/^ *{size_row} *\\([0-9][0-9]*\\).*/\\1/p' | head -1); "
        f"[ -n \"$m\" ] || {{ echo 'no \"{size_row}\" size in cilium-dbg status --verbose' >&2; exit 5; }}; "
        + ("echo \"$a $m\"; " if whole_too else "") + "echo \"$n $m\"")


#: ENTRIES MAX for the global IPv4 TCP CT map (kube-proxy replacement tracks Service flows here).
CT_READ_SCRIPT = map_read_script("cilium-dbg bpf ct list global", "TCP connection tracking")
#: ENTRIES MAX for the BPF NAT map (BPF masquerading and the nodeport SNAT of KPR): TCP IN/OUT entries.
NAT_READ_SCRIPT = map_read_script("cilium-dbg bpf nat list", "NAT")


def agents(kube) -> dict[str, str]:
    """node -> Cilium agent pod name ({} without Cilium)."""
    pods = kube.core.list_namespaced_pod(AGENT_NS, label_selector=AGENT_SELECTOR).items
    return {p.spec.node_name: p.metadata.name for p in pods}


def agent_json(session, node: str, pod: str, command: list[str], timeout: float = 60.0):
    """A Cilium agent command's JSON output; a failed exec, a non-zero exit or output that is not JSON is
    NotMeasured (never judged as "mode not reported")."""
    text = _run(session, node, pod, command, timeout)
    try:
        return text, json.loads(text)
    except ValueError:
        raise NotMeasured(f"{node}: `{' '.join(command)}` in {AGENT_NS}/{pod} printed no JSON: "
                          f"{text.strip()[:200]!r}") from None


RELAY_NAME = "hubble-relay"


def judge_relay(deployments) -> str | None:
    """Hubble Relay's Deployment (kubernetes client V1Deployment objects in kube-system): present and every
    desired replica ready (status.readyReplicas from the API, not the agent's view)."""
    found = [d for d in deployments if d.metadata.name == RELAY_NAME
             or (d.metadata.labels or {}).get("k8s-app") == RELAY_NAME]
    if not found:
        return f"no {RELAY_NAME} Deployment in {AGENT_NS} (Helm hubble.relay.enabled=false?)"
    problems = []
    for d in found:
        want = d.spec.replicas if d.spec and d.spec.replicas is not None else 1
        ready = (d.status.ready_replicas or 0) if d.status else 0
        if want < 1 or ready < want:
            problems.append(f"{d.metadata.namespace}/{d.metadata.name}: {ready}/{want} replicas ready")
    return ("Hubble Relay not ready: " + "; ".join(problems)) if problems else None


def hubble_relay_enabled(kube) -> bool:
    return bool(kube.core.list_namespaced_pod(AGENT_NS, label_selector=RELAY_SELECTOR).items)


def enforcement(session, kube) -> tuple:
    """(barrier, drop source or None, why drop reasons are unavailable) for this cluster: Cilium's agents, Hubble
    where relay is enabled; without Cilium a NoBarrier saying why (the policy checks' enforcement)."""
    found = agents(kube)
    if not found:
        barrier = NoBarrier("no Cilium agent pods (kube-system, k8s-app=cilium): policy revision unknown")
        return barrier, None, "no Cilium agents"
    drops = HubbleDrops(session, found) if hubble_relay_enabled(kube) else None
    return CiliumBarrier(session, found), drops, ("" if drops else "Hubble relay is not enabled")


def _run(session, node: str, pod: str, command: list[str], timeout: float = 60.0):
    from kubernetes.client.rest import ApiException
    try:
        res = session.exec(AGENT_NS, pod, command, timeout, container=AGENT_CONTAINER)
    except ApiException as exc:  # the exec itself was refused (pod gone, container not running): not measured
        raise NotMeasured(f"{node}: exec `{' '.join(command)[:80]}` in {AGENT_NS}/{pod} failed: "
                          f"{exc.status} {exc.reason}") from None
    if res.rc is None:
        raise NotMeasured(f"{node}: `{' '.join(command)[:80]}` in {AGENT_NS}/{pod} did not finish within "
                          f"{session.deadline(timeout):.0f}s")
    if res.rc != 0:
        raise NotMeasured(f"{node}: `{' '.join(command)[:80]}` in {AGENT_NS}/{pod} failed (exit {res.rc}): "
                          f"{(res.stderr or res.stdout).strip()[:300] or 'no output'}")
    return res.stdout


def parse_revision(node: str, text: str) -> int:
    try:
        doc = json.loads(text)
        return int(doc["revision"])
    except (ValueError, KeyError, TypeError):
        raise NotMeasured(f"{node}: `cilium-dbg policy get -o json` printed no revision: {text[:200]!r}") from None


class CiliumBarrier:
    """Each agent's policy revision reaches the one after the change, and its endpoints realized it."""

    def __init__(self, session, agents_by_node: dict[str, str], interval: float = 0.5,
                 clock=time.monotonic, sleep=time.sleep):
        self.session, self.agents = session, dict(agents_by_node)
        self.interval, self.clock, self.sleep = interval, clock, sleep

    def revisions(self) -> dict[str, int]:
        return {node: parse_revision(node, _run(self.session, node, pod, ["cilium-dbg", "policy", "get", "-o", "json"]))
                for node, pod in sorted(self.agents.items())}

    def mark(self) -> dict[str, int]:
        return self.revisions()

    def wait(self, mark: dict[str, int], changes: int, seconds: float) -> BarrierResult:
        want = {node: rev + changes for node, rev in mark.items()}
        start = self.clock()
        while True:
            now = self.revisions()
            behind = {n: f"{now[n]}<{want[n]}" for n in want if now[n] < want[n]}
            if not behind:
                break
            if self.clock() - start >= seconds:
                raise NotMeasured(f"enforcement barrier: Cilium agents did not reach the policy revision after "
                                  f"{changes} change(s) within {seconds:.0f}s: {behind}")
            self.sleep(self.interval)
        left = max(1, int(seconds - (self.clock() - start)))
        for node, pod in sorted(self.agents.items()):
            _run(self.session, node, pod, ["cilium-dbg", "policy", "wait", str(now[node]),
                                           "--max-wait-time", str(left)], timeout=left + 30)  # whole seconds
        return BarrierResult(True, f"{len(want)} agent(s) at policy revision {now} (>= mark + {changes}), "
                                   "endpoints realized it")


def parse_hubble_flows(text: str) -> list[Drop]:
    """`hubble observe -o json` lines -> drops. Lines that are not flows (e.g. lost-event notices) are skipped."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            flow = json.loads(line).get("flow") or {}
        except ValueError:
            raise NotMeasured(f"hubble observe printed a line that is not JSON: {line[:200]!r}") from None
        if flow.get("verdict") != "DROPPED":
            continue
        ip, l4 = flow.get("IP") or {}, flow.get("l4") or {}
        proto = next((p for p in ("TCP", "UDP") if p in l4), None)
        if not proto:
            continue
        out.append(Drop(ip.get("source", ""), ip.get("destination", ""), int(l4[proto].get("destination_port", 0)),
                        proto, str(flow.get("drop_reason_desc") or flow.get("drop_reason") or "UNKNOWN")))
    return out


class HubbleDrops:
    """Drops seen by every agent's Hubble server since a time."""

    def __init__(self, session, agents_by_node: dict[str, str]):
        self.session, self.agents = session, dict(agents_by_node)

    def drops(self, since: float) -> list[Drop]:
        stamp = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        found = []
        for node, pod in sorted(self.agents.items()):
            found += parse_hubble_flows(_run(self.session, node, pod, [
                "hubble", "observe", "--verdict", "DROPPED", "--since", stamp, "--last", "100000", "-o", "json"]))
        return found


def ct_reading(session, node: str, pod: str, dport: int | None = None):
    """The global TCP CT map; with ``dport`` only the entries of flows to that port (one load's own flows, so that
    the garbage collection of other flows' entries while it runs cannot hide its rise)."""
    script = CT_READ_SCRIPT if dport is None else map_read_script("cilium-dbg bpf ct list global",
                                                                  "TCP connection tracking", dport)
    return _map_reading(session, node, pod, script, "bpf-ct")


def ct_reading_pair(session, node: str, pod: str, dport: int):
    """(every TCP entry, the entries of flows to ``dport``) of the global TCP CT map from ONE listing: under TCG
    listing a map of thousands of entries takes seconds, and the conntrack check needs both before its load."""
    from conformance.judge import parse_bpf_ct
    script = map_read_script("cilium-dbg bpf ct list global", "TCP connection tracking", dport, whole_too=True)
    res = _agent_script(session, pod, script)
    lines = (res.stdout or "").splitlines()
    if res.rc != 0 or len(lines) != 2:
        parse_bpf_ct(node, res.rc, "", res.stderr or res.stdout, "bpf-ct")  # raises NotMeasured, naming the exit
    whole, port = (parse_bpf_ct(node, res.rc, line, res.stderr, "bpf-ct") for line in lines)
    return whole, port


def nat_reading(session, node: str, pod: str):
    """The BPF NAT map (``cilium-dbg bpf nat list``): where BPF masquerading and KPR's nodeport SNAT keep their
    translations (one OUT and one IN entry per translated TCP flow)."""
    return _map_reading(session, node, pod, NAT_READ_SCRIPT, "bpf-nat")


def _agent_script(session, pod: str, script: str):
    return session.exec(AGENT_NS, pod, ["sh", "-c", script], 180, container=AGENT_CONTAINER)


def _map_reading(session, node: str, pod: str, script: str, table: str):
    from conformance.judge import parse_bpf_ct
    res = _agent_script(session, pod, script)
    return parse_bpf_ct(node, res.rc, res.stdout, res.stderr, table)
