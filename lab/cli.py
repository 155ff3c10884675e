"""The ``lab`` command. The only place that turns errors into exit codes: 0 ok, 1 runtime failure, 2 bad input."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lab.errors import KvmlabError, LabError, UsageError
from lab.phase import Context, Log
from lab.pipeline import down_phases, phase_names, run_phases, up_phases
from lab.spec import Lab, load_lab
from lab.state import LabState

DEFAULT_SPEC = os.environ.get("LAB", "labs/default.yaml")
err = Console(stderr=True, highlight=False)


def _context(args: argparse.Namespace, log_name: str | None = None) -> Context:
    lab: Lab = load_lab(args.config)
    state = LabState(lab.name, args.state_dir)
    log_path = state.logs / f"{log_name}.log" if log_name else None
    return Context(lab=lab, state=state, log=Log(log_path, quiet=getattr(args, "quiet", False)))


# ---------------------------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    ctx = _context(args, "up")
    phases = up_phases()
    if args.until and args.until not in phase_names(phases):
        raise UsageError(f"--until {args.until}: no such phase; use one of {', '.join(phase_names(phases))}")
    err.print(f"[bold]lab up[/bold] {ctx.lab.name} ({args.config}) on {ctx.lab.libvirt.uri}")
    started = time.monotonic()
    try:
        run_phases(ctx, phases, until=args.until)
    except (LabError, KeyboardInterrupt):
        _collect_after_failure(ctx)
        raise
    finally:
        ctx.close()
    err.print(f"[green]lab {ctx.lab.name} is up[/green] in {time.monotonic() - started:.1f}s; "
              f"state in {ctx.state.dir}")
    return 0


def _collect_after_failure(ctx: Context) -> None:
    from lab.logs import collect_logs

    try:
        out = collect_logs(ctx, ctx.state.logs / f"failure-{time.strftime('%Y%m%d-%H%M%S')}")
        err.print(f"[yellow]logs collected in {out}[/yellow]")
    except Exception as exc:  # collecting is best effort; the original error matters more
        err.print(f"[yellow]could not collect logs: {escape(str(exc))}[/yellow]")


def cmd_preflight(args: argparse.Namespace) -> int:
    from lab.phases.preflight import check_host, format_problems

    ctx = _context(args)
    try:
        problems = check_host(ctx)
    finally:
        ctx.close()
    if problems:
        raise LabError(format_problems(ctx.lab.name, problems), hint="fix the problems above; nothing was created")
    err.print(f"[green]this host is ready for lab {ctx.lab.name}[/green] (domain type {ctx.virt_type})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    ctx = _context(args)
    err.print(f"[bold]lab down[/bold] {ctx.lab.name} on {ctx.lab.libvirt.uri}")
    try:
        run_phases(ctx, down_phases())
    finally:
        ctx.close()
    err.print(f"[green]lab {ctx.lab.name} removed[/green]")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lab.status import lab_status

    ctx = _context(args)
    try:
        status = lab_status(ctx)
    finally:
        ctx.close()
    if args.output == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    table = Table(title=f"lab {ctx.lab.name} ({status['network']['state']} network {ctx.lab.network_name})")
    for col in ("node", "role", "domain", "ip", "ssh"):
        table.add_column(col)
    for node in status["nodes"]:
        table.add_row(node["name"], node["role"], node["domain"], node["ip"] or "-", node["ssh"])
    Console().print(table)
    cluster = status.get("cluster") or {}
    detail = cluster.get("reason") or ", ".join(f"{k} {v}" for k, v in (cluster.get("nodes") or {}).items())
    Console().print(f"cluster: {cluster.get('cluster', 'unknown')}" + (f" ({detail})" if detail else ""),
                    markup=False)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from lab.render.artifacts import render_to_dir

    lab = load_lab(args.config)
    written = render_to_dir(lab, Path(args.output))
    for path in written:
        print(path)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    lab = load_lab(args.config)
    state = LabState(lab.name, args.state_dir)
    try:
        lab.node(args.node)
    except KeyError:
        raise UsageError(f"no node {args.node!r} in lab {lab.name}; nodes: "
                         f"{', '.join(n.name for n in lab.nodes)}") from None
    record = state.get_in("nodes", args.node, {})
    if not record.get("ip"):
        raise LabError(f"node {args.node} has no known address", hint="run `lab up` first")
    command = [c for c in args.command if c != "--"]
    argv = ["ssh", "-i", str(state.ssh_key),
            "-o", f"UserKnownHostsFile={state.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", f"{lab.ssh.user}@{record['ip']}", *command]
    sys.stdout.flush()
    os.execvp("ssh", argv)
    return 1  # not reached


def cmd_logs(args: argparse.Namespace) -> int:
    from lab.logs import collect_logs

    ctx = _context(args)
    try:
        out = collect_logs(ctx, Path(args.output) if args.output else
                           ctx.state.logs / f"collected-{time.strftime('%Y%m%d-%H%M%S')}")
    finally:
        ctx.close()
    print(out)
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    lab = load_lab(args.config)
    path = LabState(lab.name, args.state_dir).kubeconfig
    if not path.exists():
        raise LabError(f"no kubeconfig at {path}", hint="run `lab up` with kubernetes.enabled: true")
    print(path.resolve())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from conformance.report import main_report

    return main_report(args.a, args.b, history=args.history)


# ---------------------------------------------------------------------------------------------- parser


def cmd_bundle(args: argparse.Namespace) -> int:
    from lab.bundle.build import build_bundle, bundle_dir, current_bundle
    from lab.bundle.manifest import summary, verify

    if args.action == "build":
        path, manifest, seconds = build_bundle(args.source, force=args.force, release_base=args.release_base,
                                               release_registry=args.release_registry,
                                               say=lambda m: err.print(f"  {escape(m)}"))
        err.print(f"[green]bundle[/green] {path}: {summary(manifest)} in {seconds:.0f}s")
        print(path)
    elif args.action == "path":
        print(bundle_dir())
    else:
        path = Path(args.dir) if args.dir else current_bundle()[0]
        manifest = verify(path)
        err.print(f"[green]bundle {path} verified[/green]: {summary(manifest)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="KVM lab provisioner")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=DEFAULT_SPEC, help="lab spec (default: $LAB or labs/default.yaml)")
    common.add_argument("--state-dir", default=None, help="state root (default: $LAB_STATE_DIR or .lab)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", parents=[common], help="create or resume the lab")
    p.add_argument("--until", help="stop after this phase")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_up)
    sub.add_parser("preflight", parents=[common], help="check that this host is fit for the lab; creates nothing"
                   ).set_defaults(func=cmd_preflight)
    sub.add_parser("down", parents=[common], help="remove everything the lab created").set_defaults(func=cmd_down)
    p = sub.add_parser("status", parents=[common], help="VMs, network and cluster state")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("render", parents=[common], help="write every artifact without touching libvirt")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("ssh", parents=[common], help="SSH to a node (pinned host key)")
    p.add_argument("node")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ssh)
    p = sub.add_parser("logs", parents=[common], help="collect console, cloud-init and journal logs")
    p.add_argument("-o", "--output", help="output directory")
    p.set_defaults(func=cmd_logs)
    sub.add_parser("kubeconfig", parents=[common], help="print the kubeconfig path").set_defaults(func=cmd_kubeconfig)
    p = sub.add_parser("bundle", help="the offline bundle: build it, print its path, verify it")
    p.add_argument("action", choices=["build", "path", "verify"])
    p.add_argument("--from", dest="source", choices=["source", "release"], default="source",
                   help="source: build from the Go modules pinned in bundle/go (here); release: fetch the official "
                        "release artefacts (a host with internet)")
    p.add_argument("--force", action="store_true", help="rebuild even when a verified bundle exists")
    p.add_argument("--release-base", help="with --from release: one mirror base URL for every HTTP download")
    p.add_argument("--release-registry", help="with --from release: one registry mirror for every image "
                                              "(host:port, or http://host:port for plain HTTP)")
    p.add_argument("dir", nargs="?", help="with verify: a bundle directory (default: the current recipe's)")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("report", help="compare two conformance reports (A = baseline, B = candidate)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--history", nargs="*", default=[], metavar="REPORT",
                   help="earlier reports of the same lab: each metric's tolerance grows to twice its spread there")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the message; bad usage is exit 2
        return int(exc.code or 0)
    try:
        return args.func(args)
    except KvmlabError as exc:  # LabError, and ConformanceError from `lab report`
        err.print(f"[red]error:[/red] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[cyan]hint:[/cyan] {escape(exc.hint)}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: run the same command again to continue where it stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # node workers may still sit in a blocking SSH read: do not wait for them


if __name__ == "__main__":
    sys.exit(main())
