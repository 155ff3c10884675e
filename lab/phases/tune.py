"""Tune: kernel modules and sysctls written to the node, applied, then every value read back."""
from __future__ import annotations

from lab.errors import RemoteError
from lab.phase import Context, Phase, run_on_nodes
from lab.remote.host import Host
from lab.render.tuning import MODULES_PATH, SYSCTL_PATH, modules_conf, sysctl_conf
from lab.sysctl import normalize, parse_values, read_command
from lab.table import render_table


def read_back(host: Host, expected: dict[str, str]) -> dict[str, str | None]:
    """The node's actual value for each expected sysctl (None where the key does not exist), as root."""
    names = list(expected)
    return parse_values(host.run(*read_command(names), sudo=True).stdout, names)


def mismatches(expected: dict[str, str], actual: dict[str, str | None]) -> list[tuple[str, str, str]]:
    return [(k, normalize(v), str(actual.get(k))) for k, v in expected.items() if actual.get(k) != normalize(v)]


def mismatch_table(rows: list[tuple[str, str, str, str]]) -> str:
    """rows: (node, sysctl, expected, actual) -> an aligned text table."""
    return render_table([("node", "sysctl", "expected", "actual"), *rows])


class Tune(Phase):
    name = "tune"

    def _node_ok(self, ctx: Context, node: str) -> bool:
        host = ctx.host(node)
        files = host.run("cat", SYSCTL_PATH, MODULES_PATH, check=False).stdout
        if files != sysctl_conf(ctx.lab) + modules_conf(ctx.lab):
            return False
        return not mismatches(ctx.lab.tuning.sysctls, read_back(host, ctx.lab.tuning.sysctls))

    def done(self, ctx: Context) -> bool:
        return all(self._node_ok(ctx, n.name) for n in ctx.lab.nodes)

    def _apply(self, ctx: Context, node: str) -> list[tuple[str, str, str, str]]:
        host = ctx.host(node)
        host.put(MODULES_PATH, modules_conf(ctx.lab))
        host.put(SYSCTL_PATH, sysctl_conf(ctx.lab))
        for module in ctx.lab.tuning.modules:
            host.run("modprobe", module, sudo=True)
        result = host.run("sysctl", "-p", SYSCTL_PATH, sudo=True, check=False)
        if not result.ok:
            ctx.log.warn(f"{node}: sysctl -p reported: {result.tail(5)}")
        return [(node, *m) for m in mismatches(ctx.lab.tuning.sysctls, read_back(host, ctx.lab.tuning.sysctls))]

    def run(self, ctx: Context) -> None:
        nodes = [n.name for n in ctx.lab.nodes]
        found: dict[str, list] = {}
        run_on_nodes(nodes, lambda n: found.__setitem__(n, self._apply(ctx, n)), ctx.cancel)
        rows = [row for n in nodes for row in found[n]]
        if rows:
            raise RemoteError("tuning did not take effect on every node:\n" + mismatch_table(rows),
                              hint="check that the kernel knows each sysctl (module loaded?) and that no other "
                                   "file in /etc/sysctl.d overrides it; fix tuning.sysctls and rerun `lab up`")
        ctx.log.info(f"{len(ctx.lab.tuning.sysctls)} sysctls verified on {len(nodes)} node(s)")
