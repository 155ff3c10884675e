"""Conntrack exhaustion, inside lab VMs (never on the host): netprobe `load` through a DNAT "service" on cp1
to a `serve` on w1. With a small nf_conntrack_max, load reports failures and `facts` shows drop / early_drop /
insert_failed rising; with the tuned table, zero failures and those counters unchanged.

The host's own conntrack table is never touched: every sysctl below is written inside a VM.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from labrun import ROOT, NetnsSsh

pytestmark = [pytest.mark.e2e, pytest.mark.root]

PROBE = ROOT / "conformance" / "probes" / "netprobe.py"
SERVICE_IP, SERVICE_PORT, BACKEND_PORT = "10.96.0.10", 80, 8080
CONNECTIONS = 1500
SMALL_TABLE = 400
DROP_COUNTERS = ("drop", "early_drop", "insert_failed")


def probe(host: NetnsSsh, *args: str, timeout: float = 300) -> dict:
    result = host.run("python3", "/tmp/netprobe.py", *args, timeout=timeout)
    return json.loads(result.stdout)


def drops(facts: dict) -> dict[str, int]:
    return {k: facts["conntrack"]["stat"].get(k, 0) for k in DROP_COUNTERS}


@pytest.fixture(scope="module")
def service(up, lab, state_dir):
    """netprobe on both nodes; `serve` on w1; a DNAT rule on cp1 so its conntrack tracks every flow."""
    client, server = NetnsSsh("cp1", state_dir), NetnsSsh("w1", state_dir)
    backend = str(lab.node("w1").ip)
    code = Path(PROBE).read_text()
    for host in (client, server):
        host.run("sh", "-c", "cat > /tmp/netprobe.py", input=code)
    server.run("sh", "-c", f"setsid python3 /tmp/netprobe.py serve --tcp {BACKEND_PORT} --ready-file /tmp/ready "
                           f"--backlog 4096 >/tmp/serve.log 2>&1 < /dev/null &")
    server.run("sh", "-c", "for i in $(seq 1 60); do [ -s /tmp/ready ] && exit 0; sleep 1; done; "
                           "cat /tmp/serve.log; exit 1")
    ruleset = (f"table ip labsvc {{\n  chain out {{\n    type nat hook output priority -100; policy accept;\n"
               f"    ip daddr {SERVICE_IP} tcp dport {SERVICE_PORT} dnat to {backend}:{BACKEND_PORT}\n  }}\n}}\n")
    client.run("nft", "-f", "-", sudo=True, input=ruleset)
    yield client
    client.run("nft", "delete", "table", "ip", "labsvc", sudo=True, check=False)
    client.run("sysctl", "-w", f"net.netfilter.nf_conntrack_max={lab.tuning.sysctls['net.netfilter.nf_conntrack_max']}",
               sudo=True, check=False)
    server.run("pkill", "-f", "netprobe.py serve", sudo=True, check=False)


def load(client: NetnsSsh) -> dict:
    return probe(client, "load", "--to", f"{SERVICE_IP}:{SERVICE_PORT}", "--connections", str(CONNECTIONS),
                 "--rate", "0", "--hold", "2", "--timeout", "3")


def run_with_table(client: NetnsSsh, size: int) -> tuple[dict, dict, dict]:
    client.run("sysctl", "-w", f"net.netfilter.nf_conntrack_max={size}", sudo=True)
    client.run("conntrack", "-F", sudo=True, check=False)
    before = probe(client, "facts")
    result = load(client)
    after = probe(client, "facts")
    assert after["conntrack"]["max"] == size
    return before, result, after


def test_small_table_drops_and_probe_reports_it(service):
    before, result, after = run_with_table(service, SMALL_TABLE)
    print("small table:", json.dumps(result), "counters", drops(before), "->", drops(after))
    assert result["requested"] == CONNECTIONS
    assert result["failed"] > 0 and result["established"] < CONNECTIONS
    risen = {k: drops(after)[k] - drops(before)[k] for k in DROP_COUNTERS}
    assert any(v > 0 for v in risen.values()), f"no drop counter rose: {risen}"


def test_tuned_table_holds_every_connection(service, lab):
    size = int(lab.tuning.sysctls["net.netfilter.nf_conntrack_max"])
    before, result, after = run_with_table(service, size)
    print("tuned table:", json.dumps(result), "counters", drops(before), "->", drops(after))
    assert result["established"] == CONNECTIONS and result["failed"] == 0 and result["resets"] == 0
    assert drops(after) == drops(before)
