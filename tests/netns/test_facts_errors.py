"""`facts` never turns a counter it could not read into a value: it reports null plus an "errors" entry.
Each test hides one kernel file from netprobe in a private mount namespace, the way container runtimes
mask /proc paths."""
import json
import sys

import pytest

from topo import NETPROBE, sh


# /proc/net is /proc/self/net, whose entries cannot be bind-mounted over one by one: the script copies the
# files netprobe reads into a directory, removes the masked one and mounts that directory over its own
# /proc/$$/net (its pid survives the exec into netprobe). Anything else is masked with /dev/null (empty).
MASK = r"""
set -eu
path="$1"; dir="$2"; shift 2
case "$path" in
  /proc/net/*)
    mkdir -p "$dir/stat"
    for f in snmp snmp6 netstat route stat/nf_conntrack; do
      if [ -e "/proc/$$/net/$f" ]; then cat "/proc/$$/net/$f" > "$dir/$f"; fi
    done
    rm -f "$dir/${path#/proc/net/}"
    mount --bind "$dir" "/proc/$$/net" ;;
  *) mount --bind /dev/null "$path" ;;
esac
exec "$@"
"""


def facts_with_masked(lab, ns, path):
    fake = lab.tmp / "fake-proc-net"
    res = sh("ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", MASK,
             "mask", path, str(fake), sys.executable, str(NETPROBE), "facts", check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_clean_namespace_facts_have_no_errors(lab):
    facts = lab.probe(lab.netns("node"), "facts", slim=True)
    assert facts["errors"] == []
    assert facts["ip_fragments"]["FragCreates"] == 0 and facts["conntrack"]["count"] == 0


@pytest.mark.parametrize("path, what, key", [
    ("/proc/net/snmp", "ip_fragments", lambda f: f["ip_fragments"]),
    ("/proc/net/stat/nf_conntrack", "conntrack.stat", lambda f: f["conntrack"]["stat"]),
    ("/proc/net/netstat", "tcp_ext", lambda f: f["tcp_ext"]),
    ("/proc/sys/net/netfilter/nf_conntrack_count", "net.netfilter.nf_conntrack_count",
     lambda f: f["conntrack"]["count"]),
])
def test_unreadable_counter_is_an_error_not_zero(lab, path, what, key):
    facts = facts_with_masked(lab, lab.netns("node"), path)
    assert key(facts) is None
    errors = [e for e in facts["errors"] if e["what"] == what]
    assert len(errors) == 1 and path in errors[0]["error"], facts["errors"]
