"""The conformance harness: options, one preflight before any check, fixtures, cleanup, the run report.

Run ``pytest conformance --lab labs/default.yaml`` (kubeconfig from the lab) or ``pytest conformance --kubeconfig F``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conformance import kube as k8s
from conformance import report
from conformance.judge import DEFAULT_CONNTRACK_PEAK, DEFAULT_CONSECUTIVE, NotMeasured
from lab.cilium_status import ExpectedDatapath, expected_from_spec
from lab.sysctl import parse_values, read_command
from lab.wait import wait_for

PREFLIGHT_EXIT = k8s.PreflightError.exit_code
DEFAULT_FAILOVER_SECONDS = 30.0
#: The LB datapath under load from outside (test_outside_in.py): connections from the runner to the VIP, the pace
#: asked of netprobe load, and the bounds the measured open rate and p99 connect time are judged against.
DEFAULT_LB_LOAD_CONNECTIONS = 1000
DEFAULT_LB_LOAD_RATE = 1000.0
DEFAULT_LB_MIN_OPEN_RATE = 200.0
DEFAULT_LB_MAX_CONNECT_P99_MS = 1000.0


@dataclass
class Settings:
    kubeconfig: str | None
    lab: object | None
    probe_image: str
    expect_sysctls: dict[str, str]
    underlay_mtu: int | None
    tunnel: str
    lb_pool: list[str]
    conntrack_connections: int | None
    conntrack_hold: float
    wait_seconds: float
    policy_seconds: float
    runner_ip: str | None
    results_dir: Path
    policy_consecutive: int = DEFAULT_CONSECUTIVE
    conntrack_peak: int = DEFAULT_CONNTRACK_PEAK
    failover_seconds: float = DEFAULT_FAILOVER_SECONDS
    failover_by: str = "taint"
    append_report: bool = False
    expect_pod_sysctls: dict[str, str] = field(default_factory=dict)
    datapath: ExpectedDatapath = field(default_factory=ExpectedDatapath)
    hubble_relay: bool = True
    runner_iface: str | None = None
    lb_load_connections: int = DEFAULT_LB_LOAD_CONNECTIONS
    lb_load_rate: float = DEFAULT_LB_LOAD_RATE
    lb_min_open_rate: float = DEFAULT_LB_MIN_OPEN_RATE
    lb_max_connect_p99_ms: float = DEFAULT_LB_MAX_CONNECT_P99_MS
    outside_ip: str | None = None
    time_scale: float = 1.0
    extra: dict = field(default_factory=dict)


def pytest_addoption(parser):
    g = parser.getgroup("conformance", "network conformance suite")
    g.addoption("--kubeconfig", help="kubeconfig of the cluster (default: the lab's .lab/<name>/kubeconfig, "
                                     "then $KUBECONFIG, then ~/.kube/config)")
    g.addoption("--lab", help="lab spec (e.g. labs/default.yaml): expected tuning, pool, MTU, overlay, runner IP")
    g.addoption("--probe-image", help="image with python3 for probe pods (default: $KVMLAB_PROBE_IMAGE, else the "
                                      f"bundle's probe image for a --lab with kubernetes.source: bundle, else "
                                      f"{k8s.PROBE_IMAGE})")
    g.addoption("--expect-sysctl", action="append", default=[], metavar="NAME=VALUE",
                help="expected node sysctl (repeatable; overrides the lab's / the production set)")
    g.addoption("--expect-pod-sysctl", action="append", default=[], metavar="NAME=VALUE",
                help="a sysctl pods are configured to get (securityContext.sysctls); repeatable; a pod without "
                     "this value fails test_pods_get_the_sysctls_the_lab_claims (default: none)")
    g.addoption("--expect-kpr", choices=["true", "false"],
                help="KubeProxyReplacement the Cilium agents must report, without --lab (default true)")
    g.addoption("--expect-masquerading", choices=["bpf", "iptables"],
                help="Cilium masquerading mode, without --lab (default bpf)")
    g.addoption("--expect-host-routing", choices=["bpf", "legacy"],
                help="Cilium host routing mode, without --lab (default: bpf with bpf masquerading, else legacy)")
    g.addoption("--expect-hubble-relay", choices=["yes", "no"],
                help="whether the hubble-relay Deployment must be ready, without --lab (default yes)")
    g.addoption("--runner-iface", help="this host's link on the nodes' L2, for `netprobe arp` (default: the link of "
                                       "this host's route to the first node)")
    g.addoption("--expect-mtu", type=int, help="expected underlay (node) MTU, without --lab (default: measured)")
    g.addoption("--tunnel", choices=["vxlan", "geneve"], help="overlay protocol, without --lab (default vxlan)")
    g.addoption("--lb-pool", action="append", default=[], metavar="CIDR|FIRST-LAST",
                help="MetalLB pool addresses, without --lab (repeatable)")
    g.addoption("--runner-ip", help="this host's address as seen from pods (default: the lab's gateway)")
    g.addoption("--outside-ip", help="a second address of this host, distinct from --runner-ip, where the outside "
                                     "target ext/c2 is served (ext/web is at --runner-ip), so an ipBlock `except` can "
                                     "tell them apart (default: this host's source address on its default route "
                                     "when it differs from the runner IP and a pod reaches it; else ext/c2 is left "
                                     "out and the except step is skipped with the reason)")
    g.addoption("--conntrack-connections", type=int, help="connections for the conntrack check "
                                                          "(default: sized to the lab and nf_conntrack_max)")
    g.addoption("--conntrack-hold", type=float, default=10.0, help="seconds to hold them (default 10)")
    g.addoption("--wait-timeout", type=float, default=300.0, help="deadline for workloads to be ready (s)")
    g.addoption("--policy-timeout", type=float, help="deadline for policy tables to converge (s; default 60, "
                                                     "times --time-scale)")
    g.addoption("--time-scale", type=float, help="multiplies the deadlines of every exec and probe in a pod and the "
                "default --policy-timeout (default: 5 when the --lab spec runs its nodes under TCG, libvirt.accel "
                "tcg, where everything runs 5-10x slower; else 1)")
    g.addoption("--policy-consecutive", type=int, default=DEFAULT_CONSECUTIVE,
                help=f"full table matches in a row a policy check needs (default {DEFAULT_CONSECUTIVE})")
    g.addoption("--conntrack-peak", type=int, default=DEFAULT_CONNTRACK_PEAK,
                help=f"declared peak of tracked flows per node the conntrack table must hold with 20%% headroom "
                     f"(default {DEFAULT_CONNTRACK_PEAK})")
    g.addoption("--failover-seconds", type=float, default=DEFAULT_FAILOVER_SECONDS,
                help=f"bound on LoadBalancer failover (default {DEFAULT_FAILOVER_SECONDS:.0f}s)")
    g.addoption("--failover-by", default="taint",
                help="how the failover check takes the announcing node away: taint (a NoExecute taint evicts its "
                     "speaker; any cluster), suspend (its VM paused through libvirt) or link-down (its NIC set "
                     "down through libvirt); the last two need --lab")
    g.addoption("--lb-load-connections", type=int, default=DEFAULT_LB_LOAD_CONNECTIONS,
                help="connections from the runner to the LoadBalancer VIP, held --conntrack-hold seconds "
                     f"(default {DEFAULT_LB_LOAD_CONNECTIONS})")
    g.addoption("--lb-load-rate", type=float, default=DEFAULT_LB_LOAD_RATE,
                help=f"opens per second asked of netprobe load (0: as fast as possible; default {DEFAULT_LB_LOAD_RATE:g})")
    g.addoption("--lb-min-open-rate", type=float, default=DEFAULT_LB_MIN_OPEN_RATE,
                help="bound: the measured connection-open rate from outside, per second "
                     f"(default {DEFAULT_LB_MIN_OPEN_RATE:g})")
    g.addoption("--lb-max-connect-p99-ms", type=float, default=DEFAULT_LB_MAX_CONNECT_P99_MS,
                help="bound: the measured p99 connect time from outside, ms "
                     f"(default {DEFAULT_LB_MAX_CONNECT_P99_MS:g}; over 1 s means SYNs were retransmitted)")
    g.addoption("--append-report", action="store_true",
                help="add this run's checks to results/conformance-latest.json (the serial disruptive stage)")
    g.addoption("--results-dir", default="results", help="where the JSON report goes (default results/)")
    g.addoption("--cleanup-only", action="store_true", help="delete every namespace labelled "
                                                            f"{k8s.OWNER_LABEL}=true, then exit")


def _settings(config) -> Settings:
    opt = config.getoption
    lab = None
    if opt("--lab"):
        from lab.errors import LabError
        from lab.spec import load_lab
        try:
            lab = load_lab(opt("--lab"))
        except LabError as exc:
            raise pytest.UsageError(str(exc)) from None
    kubeconfig = opt("--kubeconfig")
    if not kubeconfig and lab is not None:
        from lab.state import LabState

        kubeconfig = str(LabState(lab.name).kubeconfig)  # honours LAB_STATE_DIR like `lab` does
    if not kubeconfig:
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if not kubeconfig and (Path.home() / ".kube" / "config").is_file():
        kubeconfig = str(Path.home() / ".kube" / "config")
    if lab is not None:
        sysctls = dict(lab.tuning.sysctls)
    else:
        from lab.spec import PRODUCTION_SYSCTLS
        sysctls = dict(PRODUCTION_SYSCTLS)
    for item in opt("--expect-sysctl"):
        name, sep, value = item.partition("=")
        if not sep:
            raise pytest.UsageError(f"--expect-sysctl {item!r}: use NAME=VALUE, e.g. net.core.somaxconn=32768")
        sysctls[name.strip()] = value.strip()
    pod_sysctls = {}
    for item in opt("--expect-pod-sysctl"):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise pytest.UsageError(f"--expect-pod-sysctl {item!r}: use NAME=VALUE, e.g. net.core.somaxconn=8192")
        pod_sysctls[name.strip()] = value.strip()
    datapath, relay = _datapath_expectation(opt, lab)
    scale = _time_scale(opt("--time-scale"), lab)
    probe_image = opt("--probe-image")
    if not probe_image and not os.environ.get(k8s.PROBE_IMAGE_ENV) and lab is not None \
            and lab.kubernetes.source == "bundle":
        from lab.bundle.recipe import load_recipe

        # An offline lab has only the bundle's images: its probe image is the one in the recipe.
        probe_image = next(ref for ref in load_recipe().images if "netprobe" in ref)
    return Settings(
        kubeconfig=kubeconfig, lab=lab, probe_image=k8s.probe_image(probe_image), expect_sysctls=sysctls,
        underlay_mtu=opt("--expect-mtu") or (lab.network.mtu if lab else None),
        tunnel=opt("--tunnel") or (lab.cilium.tunnel_protocol if lab else "vxlan"),
        lb_pool=list(opt("--lb-pool")) or (list(lab.metallb.addresses) if lab else []),
        conntrack_connections=opt("--conntrack-connections"), conntrack_hold=opt("--conntrack-hold"),
        wait_seconds=opt("--wait-timeout"), time_scale=scale,
        policy_seconds=opt("--policy-timeout") or DEFAULT_POLICY_SECONDS * scale,
        runner_ip=opt("--runner-ip"),  # else derived from the route to the nodes (fixture runner_ip)
        results_dir=Path(opt("--results-dir")), policy_consecutive=opt("--policy-consecutive"),
        conntrack_peak=opt("--conntrack-peak"), failover_seconds=opt("--failover-seconds"),
        failover_by=_failover_by(opt("--failover-by") or "taint", lab),
        append_report=opt("--append-report"), expect_pod_sysctls=pod_sysctls, datapath=datapath,
        hubble_relay=relay, runner_iface=opt("--runner-iface"), outside_ip=opt("--outside-ip"),
        **_lb_load_options(opt))


DEFAULT_POLICY_SECONDS = 60.0
PREFLIGHT_SECONDS = 10.0  # per preflight request, times --time-scale
#: --time-scale for a lab whose nodes run under TCG: on the CI cluster one observation of the whole policy table
#: (240 cells) took 55-72 s, and single probes ran past 60 s while other checks loaded the nodes.
TCG_TIME_SCALE = 5.0


def _time_scale(given: float | None, lab) -> float:
    if given is not None:
        if not 0 < given <= 100:
            raise pytest.UsageError(f"--time-scale {given:g}: use a factor above 0 and at most 100 (e.g. 5 for "
                                    "nodes under TCG)")
        return given
    return TCG_TIME_SCALE if lab is not None and lab.libvirt.accel == "tcg" else 1.0


def _failover_by(method: str, lab) -> str:
    from conformance.failover import usage_problem
    problem = usage_problem(method, lab)
    if problem:
        raise pytest.UsageError(problem)
    return method


def _lb_load_options(opt) -> dict:
    """The outside-in load check's count, pace and bounds; each must be positive (the pace may be 0: unpaced)."""
    values = {"lb_load_connections": (opt("--lb-load-connections"), DEFAULT_LB_LOAD_CONNECTIONS),
              "lb_load_rate": (opt("--lb-load-rate"), DEFAULT_LB_LOAD_RATE),
              "lb_min_open_rate": (opt("--lb-min-open-rate"), DEFAULT_LB_MIN_OPEN_RATE),
              "lb_max_connect_p99_ms": (opt("--lb-max-connect-p99-ms"), DEFAULT_LB_MAX_CONNECT_P99_MS)}
    out = {name: default if given is None else given for name, (given, default) in values.items()}
    bad = [f"--{n.replace('_', '-')} {v}" for n, v in out.items() if v < 0 or (v == 0 and n != "lb_load_rate")
           or (n == "lb_load_connections" and v > 1_000_000)]
    if bad:
        raise pytest.UsageError(f"{', '.join(bad)}: each must be positive, connections at most 1,000,000 "
                                "(--lb-load-rate 0 means unpaced)")
    return out


def _datapath_expectation(opt, lab) -> tuple[ExpectedDatapath, bool]:
    """The Cilium datapath modes and Hubble relay to expect: from the lab spec's cilium section with --lab (an
    explicit --expect-* option still wins), else from the options, defaulting to the production shape (KPR True,
    BPF masquerading, BPF host routing, --tunnel or vxlan, Hubble Ok, relay ready)."""
    if lab is not None:
        base, relay = expected_from_spec(lab.cilium), bool(lab.cilium.hubble.relay)
    else:
        base, relay = ExpectedDatapath(tunnel_protocol=opt("--tunnel") or "vxlan"), True
    kpr, masq, host = opt("--expect-kpr"), opt("--expect-masquerading"), opt("--expect-host-routing")
    masquerading = {"bpf": "BPF", "iptables": "iptables"}[masq] if masq else base.masquerading
    if host:
        host_routing = {"bpf": "BPF", "legacy": "Legacy"}[host]
    elif masq:
        host_routing = "BPF" if masquerading == "BPF" else "Legacy"
    else:
        host_routing = base.host_routing
    expected = ExpectedDatapath(kube_proxy_replacement=kpr.capitalize() if kpr else base.kube_proxy_replacement,
                                masquerading=masquerading, host_routing=host_routing,
                                tunnel_protocol=opt("--tunnel") or base.tunnel_protocol, hubble=base.hubble)
    if opt("--expect-hubble-relay"):
        relay = opt("--expect-hubble-relay") == "yes"
    return expected, relay


SETTINGS = pytest.StashKey[Settings]()
RESULTS = pytest.StashKey[list]()
STARTED = pytest.StashKey[float]()


def pytest_configure(config):
    config.stash[SETTINGS] = _settings(config)
    config.stash[RESULTS] = []
    config.stash[STARTED] = time.time()
    _CONFIG["config"] = config
    config.addinivalue_line("markers", "disruptive: changes cluster state other checks may see (node taints); "
                                       "runs in its own serial stage after all others")
    config.addinivalue_line("markers", "datapath(kind): 'load' runs alone; 'observe' (MTU, latency, policy tables) "
                                       "never runs while load is held")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Before any check: one clear error for an unusable cluster (not a page of failures), or the sweep."""
    config = session.config
    if config.option.collectonly or _is_worker(config):
        return
    settings = config.stash[SETTINGS]
    try:
        kube = k8s.connect(settings.kubeconfig)
        if config.getoption("--cleanup-only"):
            names = k8s.sweep(kube)
            taints = k8s.remove_suite_taints(kube)
            sys.stdout.write(f"\ncleanup-only: deleted {len(names)} namespace(s) labelled "
                             f"{k8s.OWNER_LABEL}=true{': ' + ', '.join(names) if names else ''}; removed "
                             f"{len(taints)} taint(s) left by disruptive checks{': ' + ', '.join(taints) if taints else ''}\n")
            pytest.exit("cleanup done", returncode=0)
        where = k8s.preflight(kube, timeout=PREFLIGHT_SECONDS * settings.time_scale)
    except k8s.PreflightError as exc:
        sys.stderr.write(f"\nERROR: conformance preflight failed, no check was run:\n  {exc}\n\n")
        pytest.exit("conformance preflight failed", returncode=PREFLIGHT_EXIT)
    sys.stdout.write(f"\ncluster: {kube.api.configuration.host} {where}; kubeconfig {settings.kubeconfig}\n")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if config.option.collectonly or _is_worker(config):
        return
    results = config.stash[RESULTS]
    if not results:
        return
    settings = config.stash[SETTINGS]
    doc = report.build(results, started=config.stash[STARTED], settings=settings, exitstatus=int(exitstatus))
    if settings.append_report:  # the serial disruptive stage adds its checks to the first stage's report
        doc = report.append(settings.results_dir, doc)
    path = report.write(doc, settings.results_dir)
    config._conformance_report = (doc, path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = getattr(config, "_conformance_report", None)
    if found:
        doc, path = found
        terminalreporter.write_sep("=", "conformance summary")
        terminalreporter.write_line(report.summary_table(doc))
        terminalreporter.write_line(f"report: {path}")


def pytest_runtest_logreport(report):
    """On the controller (xdist forwards workers' reports here): one report entry per check outcome."""
    config = _CONFIG.get("config")
    if config is None or _is_worker(config):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        config.stash[RESULTS].append(report_entry(report))
    elif report.when == "teardown" and report.outcome == "failed":
        config.stash[RESULTS].append(report_entry(report))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A check that could not measure is an ERROR with its message, never a verdict: NotMeasured, ProbeFailed, and
    a transport error reaching the API server or a node (lab.wait.is_transport_error: the real CI cluster's
    "ApiException: (0)" from a broken exec channel had been reported as FAIL)."""
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is not None and not_measured(call.excinfo.value):
        rep.user_properties.append(("not_measured", True))


def not_measured(exc: BaseException) -> bool:
    """A WaitTimeout stays a verdict: a check that waited for the cluster to do something and it never did."""
    from lab.errors import WaitTimeout
    from lab.wait import is_transport_error

    if isinstance(exc, (NotMeasured, k8s.ProbeFailed)):
        return True
    return is_transport_error(exc) and not isinstance(exc, WaitTimeout)


def scale_hang_guard(config, items, scale: float) -> float | None:
    """pytest-timeout's limit (`-o timeout=N` / `--timeout N`: a guard against hangs, never a judged bound) grows
    with --time-scale like every other deadline of work in the cluster: each check without its own
    `timeout` marker gets one of N x scale. Returns the scaled limit (None: no limit set, or scale 1)."""
    given = config.getoption("timeout", None)
    if given is None:
        try:
            given = config.getini("timeout")
        except ValueError:  # pytest-timeout not installed: nothing to scale
            return None
    base = float(given or 0)
    if base <= 0 or scale == 1:
        return None
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(base * scale))
    return base * scale


def pytest_collection_modifyitems(config, items):
    """Disruptive checks (node taints) evict other checks' pods: they run in their own serial stage, last.

    Serial run: they are moved after every other check. Under xdist, where ordering across workers is not
    guaranteed, a disruptive check collected alongside others is SKIPPED with the reason (a skip is never a pass):
    `make conformance` runs `-m "not disruptive"` in parallel, then `-m disruptive --append-report` serially."""
    scale_hang_guard(config, items, config.stash[SETTINGS].time_scale)
    disruptive = [i for i in items if i.get_closest_marker("disruptive")]
    others = [i for i in items if not i.get_closest_marker("disruptive")]
    if not disruptive or not others:
        return
    if _is_worker(config) or getattr(config.option, "numprocesses", None):
        for item in disruptive:
            item.add_marker(pytest.mark.skip(reason=DISRUPTIVE_SKIP))
    items[:] = others + disruptive


DISRUPTIVE_SKIP = ("disruptive (NoExecute taint): runs only in its own serial stage, never alongside other checks "
                   "under xdist; run `-m disruptive --append-report` without -n (make conformance does)")


def report_entry(rep) -> dict:
    props = dict(rep.user_properties)
    measured = {k[len("measured:"):]: v for k, v in props.items() if k.startswith("measured:")}
    details = {k: measured.pop(k) for k in [k for k, v in measured.items() if isinstance(v, (dict, list))]
               if k in ("policy",)}
    message = ""
    if rep.outcome == "skipped" and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        message = str(rep.longrepr[2]).removeprefix("Skipped: ")  # (path, line, "Skipped: reason"): the reason
    elif rep.outcome != "passed" and rep.longrepr is not None:
        crash = getattr(rep.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(rep.longrepr)
    verdict = {"passed": "pass", "failed": "fail", "skipped": "skip"}[rep.outcome]
    if rep.outcome == "failed" and (rep.when != "call" or props.get("not_measured")):
        verdict = "error"
    return {"id": rep.nodeid, "check": rep.nodeid.split("::")[-1], "verdict": verdict, "phase": rep.when,
            "seconds": round(rep.duration, 3), "measured": measured, "warnings": props.get("warnings", []),
            "message": message[:2000], **({"details": details} if details else {})}


_CONFIG: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _sigterm_is_an_interrupt():
    """SIGTERM (CI cancelling the job) takes the same path as Ctrl-C: finalizers delete what we created."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    yield
    signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    return pytestconfig.stash[SETTINGS]


@pytest.fixture(scope="session")
def kube(settings) -> k8s.Kube:
    return k8s.connect(settings.kubeconfig)


@pytest.fixture(scope="session")
def session(kube, settings):
    """The run's Session: creates namespaces labelled as ours and deletes them at the end, whatever happened."""
    session = k8s.Session(kube, k8s.StreamExecutor(kube), probe_image=settings.probe_image,
                          wait_seconds=settings.wait_seconds, time_scale=settings.time_scale)
    yield session
    problems = session.cleanup()
    if problems:
        sys.stderr.write("cleanup problems (run `pytest conformance --cleanup-only`):\n  "
                         + "\n  ".join(problems) + "\n")


@pytest.fixture
def measure(record_property):
    """measure(name, value): a measured value for the JSON report (failover seconds, path MTU, ...)."""
    def _measure(name: str, value):
        record_property(f"measured:{name}", value)
    return _measure


@pytest.fixture
def warn(record_property, request):
    """warn(text): a non-fatal finding, shown in the summary and the report."""
    found: list[str] = []
    record_property("warnings", found)

    def _warn(text: str):
        found.append(text)
        request.node.warn(pytest.PytestWarning(text))
    return _warn


@dataclass
class NodeFacts:
    """The privileged hostNetwork DaemonSet running netprobe: one pod per node, facts and host commands."""

    session: k8s.Session
    namespace: str
    pods: dict[str, str]  # node -> pod

    def facts(self, timeout: float = 60.0) -> dict[str, dict]:
        return {node: self.session.netprobe(self.namespace, pod, ["facts"], timeout)
                for node, pod in sorted(self.pods.items())}

    def host(self, node: str, script: str, timeout: float = 60.0, shell: str = "sh") -> k8s.ExecResult:
        """Run a shell script in the node's root filesystem (chroot /host): the node's own tools."""
        return self.session.exec(self.namespace, self.pods[node], ["chroot", "/host", shell, "-c", script], timeout)

    def sysctl(self, node: str, names: list[str], timeout: float = 60.0) -> dict[str, str | None]:
        """Read sysctls from /proc/sys inside the node's network namespace (the pod is hostNetwork)."""
        res = self.session.exec(self.namespace, self.pods[node], read_command(names), timeout)
        if res.rc != 0:
            raise k8s.ProbeFailed(f"reading sysctls on {node} failed (exit {res.rc}): {res.stderr[:200]}")
        return parse_values(res.stdout, names)


@pytest.fixture(scope="session")
def node_facts(session, kube) -> NodeFacts:
    nodes = sorted(k8s.node_addresses(kube))
    ns = session.namespace("facts", {"pod-security.kubernetes.io/enforce": "privileged"})
    session.facts_daemonset(ns)
    pods = session.wait_pods_ready(ns, "app=netprobe-facts", len(nodes), "of the netprobe-facts DaemonSet")
    by_node = {p.spec.node_name: p.metadata.name for p in pods}
    missing = sorted(set(nodes) - set(by_node))
    if missing:
        pytest.fail(f"no netprobe-facts pod on node(s) {', '.join(missing)} (taints or node selectors?)")
    return NodeFacts(session, ns, by_node)


@dataclass
class RunnerTargets:
    """netprobe serve processes on the runner host: targets outside the cluster."""

    ip: str
    ports: dict[str, int]
    procs: list

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve_on_runner(ip: str, targets: dict[str, int], udp: bool = True, timeout: float = 10.0,
                    option: str = "--runner-ip") -> RunnerTargets:
    """Start one ``netprobe serve`` per target on this host, bound to ``ip`` (given as ``option``); wait for each
    ready file."""
    import tempfile
    procs, tmp = [], Path(tempfile.mkdtemp(prefix="cf-serve-"))
    running = RunnerTargets(ip, dict(targets), procs)
    try:
        for name, port in targets.items():
            ready = tmp / f"{name}.ready"
            cmd = [sys.executable, str(k8s.NETPROBE_SOURCE), "serve", "--bind", ip, "--tcp", str(port),
                   "--ready-file", str(ready), "--workers", "1"] + (["--udp", str(port)] if udp else [])
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

            def check(ready=ready, proc=procs[-1]):
                if proc.poll() is not None:
                    raise k8s.ConformanceError(f"netprobe serve on {ip}:{port} exited: "
                                               f"{proc.stderr.read().decode()[:300]}",
                                               f"is {option} an address of this host?")
                return (True, None) if ready.exists() else (False, "not listening yet")
            wait_for(f"netprobe serve on the runner at {ip}:{port} ({name})", timeout, check, interval=0.1,
                     hint=f"is {option} an address of this host?")
    except BaseException:
        running.stop()
        raise
    return running


def netprobe_on_runner(args: list[str], timeout: float):
    """Run netprobe on this host (the runner, outside the cluster) and return its JSON. A netprobe that could not
    run, did not finish within ``timeout`` seconds or printed no JSON is a ProbeFailed, never a verdict."""
    try:
        res = subprocess.run([sys.executable, str(k8s.NETPROBE_SOURCE), *args], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise k8s.ProbeFailed(f"netprobe {args[0]} on the runner did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        raise k8s.ProbeFailed(f"netprobe {args[0]} on the runner failed (exit {res.returncode}): "
                              f"{res.stderr.strip()[:300]}")
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise k8s.ProbeFailed(f"netprobe {args[0]} on the runner printed no JSON: {res.stdout[:200]!r}") from None


def source_ip_towards(ip: str) -> str:
    """This host's address on the route to ``ip``: a connected UDP socket's name (connect sends no packet).
    Right in bridge mode too, where the lab's gateway address is not this host's."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((ip, 9))
        return sock.getsockname()[0]


#: TEST-NET-1 (RFC 5737): asking the kernel for the route to it names the default route's source; nothing is sent.
DEFAULT_ROUTE_PROBE = "192.0.2.1"


def second_outside_address(settings, runner_ip: str, towards=source_ip_towards) -> tuple[str | None, str]:
    """Where ext/c2 is served: --outside-ip, else this host's source address on its default route when it differs
    from the runner IP. Returns (address, "") or (None, why it is left out)."""
    if settings.outside_ip:
        if settings.outside_ip == runner_ip:
            raise pytest.UsageError(f"--outside-ip {runner_ip} is the runner IP: ext/c2 needs its own address")
        return settings.outside_ip, ""
    try:
        ip = towards(DEFAULT_ROUTE_PROBE)
    except OSError as exc:
        return None, (f"this host has no default route ({exc.strerror or exc}), so no second address was found; "
                      "pass --outside-ip A (another address of this host that pods reach)")
    if ip == runner_ip:
        return None, (f"this host's default-route address is the runner IP {runner_ip}; pass --outside-ip A "
                      "(another address of this host that pods reach)")
    return ip, ""


def check_runner_reachable(session, ip: str, node: str) -> None:
    """Preflight: a probe pod must reach a netprobe serve on the runner, or every check with an outside target
    would fail cell by cell. Raises ConformanceError naming the likely cause (this host's INPUT firewall)."""
    import socket
    with socket.socket() as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    runner = serve_on_runner(ip, {"preflight": port}, udp=False)
    try:
        ns = session.namespace("runner")
        session.probe_pod(ns, "reach", {"app": "reach"}, node=node)
        session.wait_pods_ready(ns, "app=reach", 1, "to probe the runner")
        [row] = session.netprobe(ns, "reach", ["connect", "--timeout", f"{session.deadline(3):g}",
                                           "--to", f"{ip}:{port}/tcp"])
    finally:
        runner.stop()
    if row.get("verdict") != "connected":
        raise k8s.ConformanceError(
            f"preflight: a pod on {node} cannot reach the runner at {ip}:{port} ({row.get('verdict')}"
            f"{': ' + row['error'] if row.get('error') else ''}); every check with a target on the runner would fail",
            "this host's firewall drops pod -> runner traffic (INPUT chain, e.g. `iptables -I INPUT -s <pod CIDR> "
            "-j ACCEPT`), or --runner-ip is not the address pods reach this host at")


@pytest.fixture(scope="session")
def runner_ip(settings, kube, session) -> str:
    """This host as pods see it: --runner-ip, else the source address of the route to the first node; proven
    reachable from a pod before any check uses it."""
    nodes = k8s.node_addresses(kube)
    ip = settings.runner_ip or source_ip_towards(nodes[sorted(nodes)[0]])
    try:
        check_runner_reachable(session, ip, sorted(nodes)[0])
    except k8s.ConformanceError as exc:
        pytest.fail(str(exc), pytrace=False)
    return ip


# ---------------------------------------------------------------------------------------------- datapath lock


def datapath_lock_path(config) -> Path:
    """One lock file per run, shared by every xdist worker (they share the controller's testrunuid)."""
    import tempfile
    uid = (getattr(config, "workerinput", None) or {}).get("testrunuid") or f"pid{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"kvmlab-conformance-{uid}.datapath.lock"


_LOCK_HELD = [0]  # this process's depth inside datapath_lock (fixtures set up inside a module's world nest)


@contextlib.contextmanager
def datapath_lock(config, kind: str):
    """Take the run's datapath lock: "load" exclusively, "observe" shared, across xdist workers. Re-entrant
    within a process (a module fixture requesting another sets up inside the first one's hold)."""
    if _LOCK_HELD[0]:
        _LOCK_HELD[0] += 1
        try:
            yield
        finally:
            _LOCK_HELD[0] -= 1
        return
    import fcntl
    with open(datapath_lock_path(config), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if kind == "load" else fcntl.LOCK_SH)
        _LOCK_HELD[0] = 1
        try:
            yield
        finally:
            _LOCK_HELD[0] = 0
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """A module's world (its pods started and made ready on the nodes: image, sandbox, Cilium endpoint) is built
    under the module's datapath lock as well, so no other worker's load runs while the nodes do that work, and a
    load module's world waits for the observers."""
    marker = request.node.get_closest_marker("datapath") if fixturedef.scope == "module" else None
    if marker is None:
        yield
        return
    with datapath_lock(request.config, marker.args[0]):
        yield


@pytest.fixture(autouse=True)
def _datapath_lock(request):
    """Load never overlaps MTU, latency or policy observation on the nodes: `datapath("load")` takes the lock
    exclusively, `datapath("observe")` shared (observers run together, never with load), across xdist workers."""
    marker = request.node.get_closest_marker("datapath")
    if marker is None:
        yield
        return
    with datapath_lock(request.config, marker.args[0]):
        yield
