"""Benchmarks for conformance/probes/netprobe.py on real network namespaces (needs root).

Prints figures and ratios; asserts nothing. Every run is bounded in count and time.
    connect: 200 targets, half of them dropped, timeout 1 s -> wall time, ratio to the timeout (goal <= 2x)
    load:    N connections across a veth pair -> held, open rate (goal: all held, >= 10,000/s)
    mtu:     probes used (goal <= 14) and wall time, for three overlay cases
Usage: python bench/probes.py [--connections 50000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "netns"))
import topo  # noqa: E402  (the same namespace helpers as tests/netns)


def pair(lab: topo.Lab, sources: int = 1):
    """client <-veth-> server: 10.200.0.1..(sources) -> 10.200.0.100, wide port range, big backlogs."""
    client, server = lab.netns("client"), lab.netns("server")
    lab.ip(client, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", server)
    for i in range(1, sources + 1):
        lab.ip(client, "addr", "add", "10.200.0.%d/24" % i, "dev", "v0")
    lab.ip(server, "addr", "add", "10.200.0.100/24", "dev", "v0")
    for ns in (client, server):
        lab.ip(ns, "link", "set", "v0", "up")
    lab.sysctl(client, "net.ipv4.ip_local_port_range", "1024 65000")
    lab.sysctl(server, "net.core.somaxconn", 65535)
    lab.sysctl(server, "net.ipv4.tcp_max_syn_backlog", 65535)
    return client, server


def timed_probe(lab, ns, *args, timeout=300):
    start = time.monotonic()
    result = lab.probe(ns, *args, timeout=timeout)
    return result, time.monotonic() - start


def bench_connect():
    lab = topo.Lab()
    try:
        client, server = pair(lab)
        open_ports = ",".join(str(p) for p in range(9000, 9100))
        lab.serve(server, tcp=open_ports, workers=1)
        lab.nft(server, "table inet blocked {\n chain input { type filter hook input priority 0; "
                        "tcp dport 9100-9199 drop; }\n}\n")
        args = ["connect", "--timeout", "1"]
        for port in range(9000, 9200):
            args += ["--to", "10.200.0.100:%d/tcp" % port]
        results, wall = timed_probe(lab, client, *args)
        verdicts = {}
        for r in results:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        print("connect: 200 targets (100 open, 100 dropped), timeout 1 s, default --parallel 128")
        print("  verdicts %s" % json.dumps(verdicts, sort_keys=True))
        print("  wall %.2f s (incl. interpreter start) -> %.2fx the timeout (goal <= 2x)" % (wall, wall / 1.0))
    finally:
        lab.close()


def bench_load(n: int):
    lab = topo.Lab()
    try:
        client, server = pair(lab, sources=2)
        lab.serve(server, tcp="8080,8081", workers=4)
        result, wall = timed_probe(lab, client, "load", "--to", "10.200.0.100:8080,8081", "--connections", str(n),
                                   "--hold", "2", "--timeout", "5", "--source", "10.200.0.1,10.200.0.2",
                                   timeout=60 + n / 1000)
        print("load: N=%d over a veth pair, 2 source addresses x 2 server ports, %d client workers, 4 serve workers"
              % (n, result["workers"]))
        print("  established %d, held %d, failed %d (timeouts %d, refused %d, resets %d) -> %s"
              % (result["established"], result["held"], result["failed"], result["timeouts"], result["refused"],
                 result["resets"], "all held" if result["held"] == n else "NOT all held"))
        print("  open rate %.0f/s (goal >= 10,000/s), open phase %.2f s, connect ms p50 %s p99 %s, wall %.1f s"
              % (result["open_rate_per_s"], result["open_seconds"], result["connect_ms_p50"],
                 result["connect_ms_p99"], wall))
        print("  wrk reference: not run. wrk measures HTTP request throughput over a fixed pool of keep-alive")
        print("    connections from ONE process (so <= 20,000 fds here) and reports no connection-open rate;")
        print("    against netprobe's non-HTTP greeter it would only count parse errors: no meaningful ratio.")
    finally:
        lab.close()


def bench_mtu():
    cases = [("vxlan overlay 1450, pods 1450 (local MTU right)", topo.Overlay(pod_mtu=1450), False),
             ("vxlan overlay 1450, pods 1500 (PMTUD via ICMP)", topo.Overlay(), False),
             ("vxlan overlay 1450, pods 1500, frag-needed dropped (black hole)", topo.Overlay(), True)]
    print("mtu: binary search with DF UDP, then 2 MiB TCP bulk (bulk timeout 3 s)")
    for label, spec, drop in cases:
        lab = topo.Lab()
        try:
            t = topo.build(lab, spec)
            if drop:
                lab.nft(t.node1, topo.DROP_FRAG_NEEDED)
                lab.nft(t.node2, topo.DROP_FRAG_NEEDED)
            lab.serve(t.pod2, tcp="7000", udp="7000")
            result, wall = timed_probe(lab, t.pod1, "mtu", "--to", topo.POD2 + ":7000", "--bulk-timeout", "3")
            print("  %-66s probes %2d (goal <= 14), path_mtu %s, verdict %-10s search+bulk %.2f s, wall %.2f s"
                  % (label, result["probes"], result["path_mtu"], result["verdict"], result["seconds"], wall))
        finally:
            lab.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=50000)
    ap.add_argument("--only", choices=("connect", "load", "mtu"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/probes.py builds network namespaces: run it as root")
    if args.only in (None, "connect"):
        bench_connect()
    if args.only in (None, "load"):
        bench_load(min(args.connections, 200000))
    if args.only in (None, "mtu"):
        bench_mtu()


if __name__ == "__main__":
    main()
