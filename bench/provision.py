"""Provisioning benchmarks (printed, never asserted).

1. The tool's own overhead: `lab up --until nodes` then `lab down` against libvirt's in-process
   `test:///default` driver (no VM boots, no I/O worth the name) for 1, 3 and 10 nodes: what remains is our
   code, XML building, seed ISO building and libvirt API calls.
2. End-to-end wall time per phase on real VMs: from the last e2e run's record (results/e2e-phases.json,
   written by tests/e2e), or run one now with --e2e (needs root and libvirtd in netns labns).

Usage: python bench/provision.py [--e2e] [--repeat N]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.cli import main as lab_main  # noqa: E402
from lab.pipeline import phase_names, up_phases  # noqa: E402


def spec_for(n: int, image: Path, name: str) -> dict:
    nodes = [{"name": "cp1", "role": "control-plane", "cpus": 1, "memory": 512, "disk": 4}]
    nodes += [{"name": f"w{i}", "role": "worker", "cpus": 1, "memory": 512, "disk": 4} for i in range(1, n)]
    return {"name": name, "libvirt": {"uri": "test:///default", "accel": "tcg"},
            "network": {"cidr": "10.252.0.0/24"}, "image": {"path": str(image)}, "nodes": nodes,
            "kubernetes": {"enabled": False}}


def overhead(nodes: int, repeat: int, work: Path, image: Path) -> dict:
    spec = work / f"bench-{nodes}.yaml"
    spec.write_text(yaml.safe_dump(spec_for(nodes, image, f"bench{nodes}")))
    ups, downs = [], []
    for _ in range(repeat):
        with contextlib.redirect_stderr(io.StringIO()):  # progress and the test driver's warnings
            t0 = time.perf_counter()
            assert lab_main(["up", "-q", "-c", str(spec), "--until", "nodes"]) == 0
            t1 = time.perf_counter()
            assert lab_main(["down", "-c", str(spec)]) == 0
        ups.append(t1 - t0)
        downs.append(time.perf_counter() - t1)
    return {"nodes": nodes, "up_s": statistics.median(ups), "down_s": statistics.median(downs)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--e2e", action="store_true", help="also run one real e2e cycle now (root, labns)")
    args = parser.parse_args()
    import libvirt

    keep = libvirt.open("test:///default")  # the test driver's state lives while a connection is open
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LAB_STATE_DIR"] = str(work / "state")
        image = work / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
        print("tool overhead against libvirt test:///default (up --until nodes, then down), median of",
              args.repeat)
        print(f"{'nodes':>5} {'up s':>8} {'down s':>8} {'up ms/node':>11}")
        for n in (1, 3, 10):
            r = overhead(n, args.repeat, work, image)
            print(f"{n:>5} {r['up_s']:>8.3f} {r['down_s']:>8.3f} {1000 * r['up_s'] / n:>11.1f}")
    keep.close()
    if args.e2e:
        subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests/e2e/test_lab_e2e.py"), "-q"], cwd=ROOT)
    record = ROOT / "results" / "e2e-phases.json"
    if record.exists():
        data = json.loads(record.read_text())
        print(f"\ne2e wall time per phase ({data.get('spec')}, {data.get('virt_type')}, recorded "
              f"{data.get('recorded_at')}):")
        order = [*phase_names(up_phases()), "_total"]
        for name in sorted(data["phases"], key=lambda n: order.index(n) if n in order else len(order)):
            entry = data["phases"][name]
            print(f"  {name:<11} {entry['status']:<9} {entry['seconds']:>8.1f}s")
    else:
        print("\nno e2e record yet: run `make test` (or this script with --e2e) to produce results/e2e-phases.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
