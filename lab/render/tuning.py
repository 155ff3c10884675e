"""Node tuning files: /etc/sysctl.d/90-lab.conf and /etc/modules-load.d/lab.conf (pure functions of the Lab)."""
from __future__ import annotations

from lab.spec import Lab

SYSCTL_PATH = "/etc/sysctl.d/90-lab.conf"
MODULES_PATH = "/etc/modules-load.d/lab.conf"


def sysctl_conf(lab: Lab) -> str:
    lines = [f"# Written by lab for lab {lab.name}. Read back after every apply.",
             "# nf_conntrack_tcp_timeout_established=86400 LOWERS the kernel default (432000)."]
    lines += [f"{name} = {value}" for name, value in lab.tuning.sysctls.items()]
    return "\n".join(lines) + "\n"


def modules_conf(lab: Lab) -> str:
    return "".join(f"{m}\n" for m in [f"# Written by lab for lab {lab.name}.", *lab.tuning.modules])
