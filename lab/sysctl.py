"""Sysctls read from a node, the one way: a shell loop over /proc/sys (no procps needed, so the same command runs
on a lab node over SSH and in a slim hostNetwork pod), and values compared in one normal form.

netprobe (stdlib-only, runs in pods) keeps its own reader; everything in lab/ and conformance/ uses this one.
"""
from __future__ import annotations

MISSING = "<missing>"

#: Prints ``name<TAB>value`` for every name given as an argument; ``<missing>`` where the key does not exist.
READ_SCRIPT = ('for k in "$@"; do printf "%s\\t" "$k"; '
               'cat "/proc/sys/$(printf %s "$k" | tr . /)" 2>/dev/null || echo "' + MISSING + '"; done')


def normalize(value) -> str | None:
    """sysctl values compare as whitespace-collapsed strings ('4096\\t87380' == '4096 87380'); None stays None."""
    return None if value is None else " ".join(str(value).split())


def read_command(names: list[str]) -> list[str]:
    """The argv that reads ``names`` (run it as root on a node, or in a hostNetwork pod)."""
    return ["sh", "-c", READ_SCRIPT, "sh", *names]


def parse_values(stdout: str, names: list[str]) -> dict[str, str | None]:
    """``read_command``'s output -> name -> normalised value (None where the key is missing or empty)."""
    out: dict[str, str | None] = {n: None for n in names}
    for line in stdout.splitlines():
        name, sep, value = line.partition("\t")
        if sep and name in out:
            out[name] = None if value == MISSING else (normalize(value) or None)
    return out
