#!/usr/bin/env bash
# Does the emulated CPU model change what a TCG node's control plane pays for crypto? Runs bench/tcgcpu (TLS 1.3
# handshakes with RSA-2048 and ECDSA P-256 certificates, AES-128-GCM, SHA-256) natively and under qemu-user's TCG
# (the translator system emulation uses) with each CPU model, RUNS times each, and prints medians and slowdowns.
#   bench/tcg-cpu-model.sh [MODEL...]   (default: Nehalem, the lab's TCG model; Westmere, Nehalem + AES-NI/PCLMUL; max)
set -euo pipefail
cd "$(dirname "$0")/tcgcpu"
command -v qemu-x86_64 >/dev/null || { echo "tcg-cpu-model: needs qemu-x86_64 (apt-get install qemu-user)" >&2; exit 2; }
RUNS=${RUNS:-3}
bin=$(mktemp -d)/tcgcpu
trap 'rm -rf "$(dirname "$bin")"' EXIT
CGO_ENABLED=0 go build -o "$bin" .
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(Nehalem Westmere max)
{
  for _ in $(seq "$RUNS"); do printf 'native %s\n' "$("$bin" -handshakes 10 -mib 8)"; done
  for m in "${models[@]}"; do
    for _ in $(seq "$RUNS"); do printf '%s %s\n' "$m" "$(qemu-x86_64 -cpu "$m" "$bin" -handshakes 10 -mib 8)"; done
  done
} | python3 -c '
import json, statistics, sys
runs = {}
for line in sys.stdin:
    model, doc = line.split(" ", 1)
    for k, v in json.loads(doc).items():
        runs.setdefault(model, {}).setdefault(k, []).append(v)
med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in runs.items()}
keys = sorted(med["native"])
print(f"{chr(32)*10}" + "".join(f"{k:>22}" for k in keys))
for m, d in med.items():
    cells = []
    for k in keys:
        slow = d[k] / med["native"][k] if k.endswith("_ms") else med["native"][k] / d[k]
        cells.append(f"{d[k]:10.1f} ({slow:5.1f}x)" if m != "native" else f"{d[k]:10.1f}         ")
    print(f"{m:10}" + "".join(f"{c:>22}" for c in cells))
print("(medians of", len(next(iter(runs["native"].values()))), "runs; x: slower than native)")
'
