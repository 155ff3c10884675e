"""Run netprobe exactly as in a probe pod: the probe image's Python (3.12 when this machine has it), PATH holding
only python3 (no ip, iptables, nft, conntrack), an empty environment, and uid/gid 65534 (the restricted
securityContext) -- dropped with os.setuid inside the interpreter just before netprobe's main() runs, since uid
65534 cannot read the pyenv tree under /root. Node-side probes (the privileged facts DaemonSet) run as uid 0."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from topo import NETPROBE, Lab, sh

PROBE_PYTHON = next((p for p in ("/root/.pyenv/versions/3.12.1/bin/python3.12", shutil.which("python3.12") or "")
                     if p and os.access(p, os.X_OK)), sys.executable)
POD_UID = 65534

#: argv: UID NETPROBE ARGS...; imports netprobe (and so every module it uses), drops to UID, runs main().
BOOT = ("import encodings.idna, importlib.util, os, sys\n"
        "uid = int(sys.argv[1]); spec = importlib.util.spec_from_file_location('netprobe', sys.argv[2])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "if uid:\n os.setgroups([]); os.setgid(uid); os.setuid(uid)\n"
        "sys.exit(mod.main(sys.argv[3:]))\n")


def slim_dir(lab: Lab) -> str:
    """The PATH directory holding only python3; safe when several probes start at once (threads)."""
    d = lab.tmp / "pod-bin"
    d.mkdir(exist_ok=True)
    try:
        (d / "python3").symlink_to(PROBE_PYTHON)
    except FileExistsError:
        pass  # made by a probe started at the same time
    return str(d)


def pod_argv(lab: Lab, ns: str, args, uid: int = POD_UID, prefix=()) -> list[str]:
    path = slim_dir(lab)
    return ["ip", "netns", "exec", ns, *prefix, "env", "-i", "PATH=" + path, path + "/python3", "-c", BOOT,
            str(uid), str(NETPROBE), *map(str, args)]


def pod_probe(lab: Lab, ns: str, *args, uid: int = POD_UID, prefix=(), timeout: float = 120):
    res = sh(*pod_argv(lab, ns, args, uid, prefix), check=False, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError("netprobe %s rc=%d\nstdout=%s\nstderr=%s" % (args, res.returncode, res.stdout, res.stderr))
    return json.loads(res.stdout)


def pod_spawn(lab: Lab, ns: str, *args, uid: int = POD_UID) -> subprocess.Popen:
    proc = subprocess.Popen(pod_argv(lab, ns, args, uid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    return proc


def node_probe(lab: Lab, ns: str, *args, **kw):
    """The facts DaemonSet: privileged (uid 0), hostNetwork, the same slim image."""
    return pod_probe(lab, ns, *args, uid=0, **kw)


def pod_shell(lab: Lab, ns: str, argv: list[str], uid: int = POD_UID) -> subprocess.CompletedProcess:
    """A command the check runs with the pod image's shell (sh, cat, tr), as the pod's user."""
    return sh("ip", "netns", "exec", ns, "setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
              *argv, check=False)


