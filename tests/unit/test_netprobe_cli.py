"""netprobe's interface: exit codes, messages, JSON shapes, loopback-only behaviour."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

NETPROBE = Path(__file__).resolve().parents[2] / "conformance" / "probes" / "netprobe.py"
VERDICTS = {"connected", "refused", "timeout", "unreachable", "reset", "error"}


def run(*args, timeout=60):
    res = subprocess.run([sys.executable, str(NETPROBE), *args], capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout, res.stderr


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    ready = tmp_path_factory.mktemp("serve") / "ready"
    proc = subprocess.Popen([sys.executable, str(NETPROBE), "serve", "--tcp", str(port), "--udp", str(port),
                             "--bind", "127.0.0.1", "--ready-file", str(ready), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    yield port, json.loads(ready.read_text()), proc
    if proc.poll() is None:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("args, message", [
    ((), "required"),
    (("bogus",), "invalid choice"),
    (("connect",), "at least one --to"),
    (("connect", "--to", "127.0.0.1:80"), "HOST:PORT/tcp"),
    (("connect", "--to", "127.0.0.1:80/sctp"), "HOST:PORT/tcp"),
    (("connect", "--to", "127.0.0.1:0/tcp"), "port must be 1..65535"),
    (("connect", "--to", "127.0.0.1:80/tcp", "--timeout", "-1"), "must be > 0"),
    (("connect", "--targets", "/nonexistent/targets"), "cannot read --targets"),
    (("mtu",), "--to"),
    (("mtu", "--to", "127.0.0.1:7000", "--max", "4"), "largest packet size"),
    (("load", "--to", "127.0.0.1:80"), "--connections"),
    (("load", "--to", "127.0.0.1:80", "--connections", "0"), "must be > 0"),
    (("load", "--to", "127.0.0.1", "--connections", "5"), "expected HOST:PORT"),
    (("serve", "--tcp", "80,x"), "port must be"),
    (("serve", "--tcp", "80", "--http", "80"), "either --tcp or --http"),
    (("connect", "--to", "127.0.0.1:53/dns", "--dns-type", "MX"), "invalid choice"),
    (("mtu", "--to", "127.0.0.1:7000", "--retries", "10"), "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    rc, out, err = run(*args)
    assert rc == 2
    assert message in err
    assert "error" in json.loads(out)


def test_serve_that_cannot_listen_exits_1(server):
    port, _, _ = server
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)  # a listener without SO_REUSEPORT: serve cannot share its port
    try:
        rc, out, err = run("serve", "--tcp", str(blocker.getsockname()[1]), "--bind", "127.0.0.1")
    finally:
        blocker.close()
    assert rc == 1 and "cannot listen" in json.loads(out)["error"] and "cannot listen" in err


def test_mtu_to_an_unresolvable_host_exits_1():
    rc, out, _ = run("mtu", "--to", "no-such-host.invalid:7000")
    assert rc == 1 and "error" in json.loads(out)


def test_connect_on_loopback_gives_one_verdict_per_target(server, tmp_path):
    port, _, _ = server
    closed_tcp, closed_udp = free_port(), free_port(socket.SOCK_DGRAM)
    targets = tmp_path / "targets"
    targets.write_text("# comment\n127.0.0.1:%d/udp\n\n127.0.0.1:%d/udp\n" % (port, closed_udp))
    rc, out, _ = run("connect", "--to", "127.0.0.1:%d/tcp" % port, "--to", "127.0.0.1:%d/tcp" % closed_tcp,
                     "--to", "no-such-host.invalid:80/tcp", "--targets", str(targets), "--timeout", "2")
    assert rc == 0
    results = json.loads(out)
    assert [(r["to"], r["verdict"]) for r in results] == [
        ("127.0.0.1:%d/tcp" % port, "connected"),
        ("127.0.0.1:%d/tcp" % closed_tcp, "refused"),
        ("no-such-host.invalid:80/tcp", "error"),
        ("127.0.0.1:%d/udp" % port, "connected"),
        ("127.0.0.1:%d/udp" % closed_udp, "refused"),
    ]
    for r in results:
        assert set(r) == {"to", "proto", "verdict", "ms", "peer_host", "tries", "errno", "error"}
        assert r["verdict"] in VERDICTS and r["ms"] >= 0 and r["tries"] >= 1
    assert results[0]["peer_host"] == socket.gethostname()
    assert results[1]["errno"] == "ECONNREFUSED"
    assert results[2]["error"].startswith("resolve:")


def test_mtu_on_loopback_finds_the_capped_size_and_bulk_arrives(server):
    port, _, _ = server
    rc, out, _ = run("mtu", "--to", "127.0.0.1:%d" % port, "--max", "1500", "--bulk-mib", "1")
    assert rc == 0
    result = json.loads(out)
    assert set(result) >= {"largest_udp_payload", "path_mtu", "probes", "local_route_mtu", "tcp_bulk", "verdict"}
    assert (result["path_mtu"], result["largest_udp_payload"], result["verdict"]) == (1500, 1472, "ok")
    assert result["tcp_bulk"]["ok"] is True and result["tcp_bulk"]["bytes"] == 1024 * 1024
    assert result["probes"] <= 14


def test_mtu_to_a_port_nobody_serves_is_unreachable_not_a_crash():
    rc, out, _ = run("mtu", "--to", "127.0.0.1:%d" % free_port(socket.SOCK_DGRAM), "--timeout", "0.2")
    assert rc == 0
    result = json.loads(out)
    assert result["verdict"] == "unreachable" and result["path_mtu"] is None and result["tcp_bulk"] is None


def test_load_on_loopback_holds_all_connections(server):
    port, _, _ = server
    rc, out, _ = run("load", "--to", "127.0.0.1:%d" % port, "--connections", "400", "--rate", "4000",
                     "--hold", "0.5", "--timeout", "2", "--workers", "2")
    assert rc == 0
    result = json.loads(out)
    assert set(result) >= {"requested", "established", "failed", "resets", "timeouts", "open_rate_per_s",
                           "connect_ms_p50", "connect_ms_p99"}
    assert (result["requested"], result["established"], result["held"], result["failed"]) == (400, 400, 400, 0)
    assert result["workers"] == 2


def test_load_to_a_closed_port_counts_refusals(server):
    rc, out, _ = run("load", "--to", "127.0.0.1:%d" % free_port(), "--connections", "50", "--hold", "0")
    result = json.loads(out)
    assert rc == 0 and result["established"] == 0 and result["failed"] == result["refused"] == 50


def test_serve_reports_counts_when_terminated(server):
    port, listening, proc = server
    assert listening["tcp"] == [port] and listening["udp"] == [port]
    run("connect", "--to", "127.0.0.1:%d/tcp" % port, "--timeout", "2")
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    stats = json.loads(out)
    assert proc.returncode == 0 and stats["accepted"] >= 1 and stats["worker_errors"] == []


def python_only_path(tmp_path, **tools):
    """A PATH holding python3 and the given fake tools (name -> shell body), like a slim probe image."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def run_facts(path):
    res = subprocess.run([os.path.join(path, "python3"), str(NETPROBE), "facts"], capture_output=True, text=True,
                         timeout=60, env={"PATH": path})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_facts_shape_on_this_host():
    rc, out, _ = run("facts")
    assert rc == 0
    facts = json.loads(out)
    assert set(facts) >= {"sysctls", "interfaces", "default_route", "conntrack", "ip_fragments",
                          "kube_proxy_running", "kube_services_rules", "errors"}
    assert "net.netfilter.nf_conntrack_max" in facts["sysctls"]
    assert any(i["name"] == "lo" for i in facts["interfaces"])


def test_facts_without_iptables_or_nft_cannot_tell_kube_rules(tmp_path):
    """A slim pod: no iptables-save, no nft. Unknown is None, never False ("no rules")."""
    facts = run_facts(python_only_path(tmp_path))
    assert facts["kube_services_rules"] == {"present": None, "sources": {}}


@pytest.mark.parametrize("body, present, source", [
    ("echo '-A PREROUTING -j KUBE-SERVICES'", True, True),
    ("echo '*nat'; echo COMMIT", False, False),
])
def test_facts_reads_iptables_save(tmp_path, body, present, source):
    facts = run_facts(python_only_path(tmp_path, **{"iptables-save": body}))
    assert facts["kube_services_rules"] == {"present": present, "sources": {"iptables-save": source}}
    assert not [e for e in facts["errors"] if e["what"].startswith("kube_services_rules")]


def test_facts_failing_iptables_save_is_an_error_not_no_rules(tmp_path):
    facts = run_facts(python_only_path(tmp_path, **{"iptables-save": "echo 'Permission denied (you must be root)' >&2; exit 4"}))
    assert facts["kube_services_rules"] == {"present": None, "sources": {"iptables-save": None}}
    errors = [e for e in facts["errors"] if e["what"] == "kube_services_rules.iptables-save"]
    assert len(errors) == 1 and "exited 4" in errors[0]["error"] and "Permission denied" in errors[0]["error"]


def test_facts_default_route_does_not_need_ip(tmp_path):
    """The route MTU comes from rtnetlink and IP_MTU, the same with or without `ip` on PATH."""
    with_ip = run("facts")[1]
    without = run_facts(python_only_path(tmp_path))["default_route"]
    assert without == json.loads(with_ip)["default_route"]
    if without is not None:
        assert without["source"] == "rtnetlink" and without["effective_mtu"] == without["kernel_mtu"]


def start_serve(tmp_path, *args):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(NETPROBE), "serve", "--bind", "127.0.0.1", "--ready-file",
                             str(ready), "--workers", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    return proc


def stop_serve(proc):
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return json.loads(out)


def test_http_serve_and_connect_on_loopback(tmp_path):
    http, greeter, closed = free_port(), free_port(), free_port()
    proc = start_serve(tmp_path, "--http", str(http), "--tcp", str(greeter))
    try:
        rc, out, _ = run("connect", "--to", "127.0.0.1:%d/http" % http, "--to", "127.0.0.1:%d/http" % greeter,
                         "--to", "127.0.0.1:%d/http" % closed, "--timeout", "2")
    finally:
        stats = stop_serve(proc)
    assert rc == 0
    ok, not_http, refused = json.loads(out)
    assert (ok["verdict"], ok["peer_host"], ok["http"]["status"]) == ("connected", socket.gethostname(), 200)
    assert json.loads(ok["http"]["body"])["host"] == socket.gethostname()
    assert not_http["verdict"] == "error" and "not an HTTP response" in not_http["error"]  # the TCP greeter
    assert (refused["verdict"], refused["errno"], "http" in refused) == ("refused", "ECONNREFUSED", False)
    assert stats["http_requests"] == 1 and stats["listening"]["http"] == [http]


def test_mtu_with_nothing_listening_on_tcp_reports_refused_not_black_hole(tmp_path):
    """Defect 12: UDP echoes, TCP port closed: the bulk connection is refused, and mtu says so."""
    port = free_port()
    proc = start_serve(tmp_path, "--udp", str(port))
    try:
        rc, out, _ = run("mtu", "--to", "127.0.0.1:%d" % port, "--max", "1500", "--bulk-mib", "1")
    finally:
        stop_serve(proc)
    assert rc == 0
    result = json.loads(out)
    assert (result["path_mtu"], result["verdict"]) == (1500, "refused")
    assert result["tcp_bulk"]["verdict"] == "refused" and result["tcp_bulk"]["stage"] == "connect"
    assert result["tcp_bulk"]["errno"] == "ECONNREFUSED"
