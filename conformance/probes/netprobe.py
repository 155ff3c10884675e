#!/usr/bin/env python3
"""netprobe: measure what the network conformance checks judge.

One stdlib-only file (Python 3.9+) that runs unchanged in a pod, on a node and
in our netns tests. Every subcommand prints ONE JSON document on stdout.
Exit codes: 0 the probe ran (whatever it found), 2 bad arguments, 1 could not run.

  serve   --tcp PORTS --udp PORTS [--bind ADDR] [--ready-file F] [--workers W]
  connect --to HOST:PORT/PROTO [--to ...] [--targets FILE] --timeout S --parallel N
  mtu     --to HOST:PORT [--max BYTES] [--bulk-mib N] [--timeout S]
  load    --to HOST:PORT[,PORT...] --connections N --rate R --hold S --timeout S [--source A,B]
  facts
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import platform
import resource
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque

CONNECTED, REFUSED, TIMEOUT = "connected", "refused", "timeout"
UNREACHABLE, RESET, ERROR = "unreachable", "reset", "error"

# Linux socket option numbers that older Pythons do not export.
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU, IP_BIND_ADDRESS_NO_PORT = 10, 2, 14, 24
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24
TCP_ESTABLISHED = 1

TUNING_SYSCTLS = (
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_forward",
    "net.ipv4.neigh.default.gc_thresh1",
    "net.ipv4.neigh.default.gc_thresh2",
    "net.ipv4.neigh.default.gc_thresh3",
    "net.bridge.bridge-nf-call-iptables",
)


class CannotRun(Exception):
    """The probe could not run at all (exit 1)."""


def emit(doc) -> None:
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    sys.stdout.flush()


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# ---------------------------------------------------------------- arguments

def split_host_port(text: str):
    """'10.0.0.1:80', '[fd00::1]:80', 'svc.ns:53' -> (host, port string)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host, port


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("port must be 1..65535, got %r" % text)
    return int(text)


def port_list(text: str):
    return [port_number(p.strip()) for p in text.split(",") if p.strip()]


def host_port(text: str):
    host, port = split_host_port(text)
    return host, port_number(port)


def host_ports(text: str):
    host, ports = split_host_port(text)
    return host, port_list(ports)


def target(text: str):
    """HOST:PORT/PROTO -> dict(to, host, port, proto)."""
    hp, sep, proto = text.strip().rpartition("/")
    proto = proto.lower()
    if not sep or proto not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError("expected HOST:PORT/tcp or HOST:PORT/udp, got %r" % text)
    host, port = host_port(hp)
    return {"to": "%s/%s" % (hp, proto), "host": host, "port": port, "proto": proto}


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0, got %r" % text)
        return value
    return parse


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0, got %r" % text)
    return value


def resolve(host: str, port: int, kind=socket.SOCK_STREAM):
    """First address of host -> (family, sockaddr). Raises OSError."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, kind)[0]
    return family, sockaddr


def errno_name(err) -> str:
    return errno.errorcode.get(err, str(err)) if err else ""


def verdict_of(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return REFUSED
    if err == errno.ETIMEDOUT:
        return TIMEOUT
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN):
        return UNREACHABLE
    if err in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return RESET
    return ERROR


# ---------------------------------------------------------------- serve

def listen_tcp(bind: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_udp(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    sock.setblocking(False)
    return sock


def default_bind() -> str:
    return "::" if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6") else "0.0.0.0"


def peer_text(addr) -> str:
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return "%s:%d" % (host, addr[1])


class ServeWorker:
    """One process: its own SO_REUSEPORT listeners, an epoll loop, many held connections."""

    def __init__(self, listeners, udp_socks):
        self.sel = selectors.DefaultSelector()
        self.host = socket.gethostname()
        self.stats = {"accepted": 0, "tcp_bytes": 0, "udp_echoed": 0, "max_open": 0, "accept_errors": 0}
        self.open = {}
        self.paused = []
        self.stop = False
        for sock in listeners:
            self.sel.register(sock, selectors.EVENT_READ, "listen")
        for sock in udp_socks:
            self.sel.register(sock, selectors.EVENT_READ, "udp")

    def run(self) -> dict:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        while not self.stop:
            for key, _ in self.sel.select(0.5):
                getattr(self, "on_" + key.data)(key.fileobj)
            self.resume_listeners()
        return self.stats

    def on_stop(self, *_):
        self.stop = True

    def on_listen(self, lsock):
        for _ in range(256):
            try:
                conn, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE: leave the rest in the backlog, retry later
                self.stats["accept_errors"] += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.sel.unregister(lsock)
                    self.paused.append((time.monotonic() + 0.5, lsock))
                return
            self.greet(conn, addr, lsock.getsockname()[1])

    def greet(self, conn, addr, port):
        conn.setblocking(False)
        line = json.dumps({"host": self.host, "peer": peer_text(addr), "port": port}) + "\n"
        try:
            conn.send(line.encode())
        except OSError:
            conn.close()
            return
        self.stats["accepted"] += 1
        self.open[conn.fileno()] = [conn, 0]
        self.stats["max_open"] = max(self.stats["max_open"], len(self.open))
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def on_conn(self, conn):
        entry = self.open[conn.fileno()]
        try:
            data = conn.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if data:
            entry[1] += len(data)
            self.stats["tcp_bytes"] += len(data)
            return
        if data == b"":  # orderly close (or half-close after a bulk transfer): confirm the count
            try:
                conn.send((json.dumps({"received": entry[1]}) + "\n").encode())
            except OSError:
                pass
        self.sel.unregister(conn)
        del self.open[conn.fileno()]
        conn.close()

    def on_udp(self, sock):
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65535)
                sock.sendto(data, addr)
                self.stats["udp_echoed"] += 1
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def resume_listeners(self):
        now = time.monotonic()
        for item in [p for p in self.paused if p[0] <= now]:
            self.paused.remove(item)
            self.sel.register(item[1], selectors.EVENT_READ, "listen")


def fork_worker(body):
    """Run body() in a child; return (pid, read end of a pipe carrying its JSON result)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        code = 0
        try:
            result = body()
        except BaseException as exc:  # the child must never return into the parent's code
            result, code = {"error": "%s: %s" % (type(exc).__name__, exc)}, 1
        with os.fdopen(wfd, "w") as out:
            out.write(json.dumps(result))
        os._exit(code)
    os.close(wfd)
    return pid, rfd


def collect(workers):
    results = []
    for pid, rfd in workers:
        with os.fdopen(rfd) as src:
            text = src.read()
        os.waitpid(pid, 0)
        results.append(json.loads(text) if text else {"error": "worker %d died" % pid})
    return results


def cmd_serve(args) -> dict:
    raise_nofile_limit()
    bind = args.bind or default_bind()
    if not args.tcp and not args.udp:
        raise CannotRun("nothing to serve: give --tcp and/or --udp")
    try:
        sets = [[listen_tcp(bind, p, args.backlog) for p in args.tcp] for _ in range(args.workers)]
        udp = [bind_udp(bind, p) for p in args.udp]
    except OSError as exc:
        raise CannotRun("cannot listen on %s: %s" % (bind, exc))
    listening = {"bind": bind, "tcp": args.tcp, "udp": args.udp, "workers": args.workers,
                 "backlog": args.backlog, "pid": os.getpid()}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    workers = []
    for i, mine in enumerate(sets):
        body = lambda mine=mine, i=i: ServeWorker(mine, udp if i == 0 else []).run()
        workers.append(fork_worker(body))
    for sock in [s for group in sets for s in group] + udp:
        sock.close()
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as out:
            json.dump(listening, out)
        os.rename(args.ready_file + ".tmp", args.ready_file)
    while not stop and all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid, _ in workers):
        time.sleep(0.2)
    for pid, _ in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    results = collect(workers)
    totals = {k: sum(r.get(k, 0) for r in results)
              for k in ("accepted", "tcp_bytes", "udp_echoed", "max_open", "accept_errors")}
    totals["listening"] = listening
    totals["worker_errors"] = [r["error"] for r in results if "error" in r]
    return totals


# ---------------------------------------------------------------- connect

class Attempt:
    def __init__(self, tgt):
        self.tgt = tgt
        self.sock = None
        self.state = "new"
        self.start = self.deadline = self.next_send = 0.0
        self.ms = None
        self.tries = 0
        self.buf = b""
        self.result = None
        self.token = os.urandom(8).hex().encode()

    def finish(self, verdict, err=0, peer_host=None, detail=None):
        if self.ms is None:
            self.ms = (time.monotonic() - self.start) * 1000.0
        self.result = {"to": self.tgt["to"], "proto": self.tgt["proto"], "verdict": verdict,
                       "ms": round(self.ms, 3), "peer_host": peer_host, "tries": max(self.tries, 1),
                       "errno": errno_name(err) or None, "error": detail or (os.strerror(err) if err else None)}
        if self.sock is not None:
            self.sock.close()


class ConnectRun:
    """All attempts in one epoll loop, at most `parallel` in flight."""

    def __init__(self, targets, timeout, parallel, udp_tries):
        self.todo = deque(Attempt(t) for t in targets)
        self.all = list(self.todo)
        self.timeout, self.parallel, self.udp_tries = timeout, parallel, udp_tries
        self.sel = selectors.DefaultSelector()
        self.active = []

    def run(self):
        while self.todo or self.active:
            while self.todo and len(self.active) < self.parallel:
                self.begin(self.todo.popleft())
            now = time.monotonic()
            wake = min([a.deadline for a in self.active] + [a.next_send for a in self.active if a.state == "udp"]
                       + [now + 0.5])
            for key, _ in self.sel.select(max(0.0, wake - now)):
                self.on_event(key.data)
            self.tick(time.monotonic())
        return [a.result for a in self.all]

    def begin(self, att):
        att.start = time.monotonic()
        att.deadline = att.start + self.timeout
        try:
            family, addr = resolve(att.tgt["host"], att.tgt["port"])
            kind = socket.SOCK_STREAM if att.tgt["proto"] == "tcp" else socket.SOCK_DGRAM
            att.sock = socket.socket(family, kind)
            att.sock.setblocking(False)
            err = att.sock.connect_ex(addr)
        except socket.gaierror as exc:
            return att.finish(ERROR, detail="resolve: %s" % exc)
        except OSError as exc:
            return att.finish(verdict_of(exc.errno), exc.errno)
        if err not in (0, errno.EINPROGRESS):
            return att.finish(verdict_of(err), err)
        self.active.append(att)
        if att.tgt["proto"] == "tcp":
            att.state = "connecting"
            self.sel.register(att.sock, selectors.EVENT_WRITE, att)
        else:
            att.state = "udp"
            self.sel.register(att.sock, selectors.EVENT_READ, att)
            self.udp_send(att)

    def done(self, att, *result, **kw):
        self.sel.unregister(att.sock)
        self.active.remove(att)
        att.finish(*result, **kw)

    def on_event(self, att):
        if att.state == "connecting":
            err = att.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.done(att, verdict_of(err), err)
            att.ms = (time.monotonic() - att.start) * 1000.0
            att.state = "greeting"
            self.sel.modify(att.sock, selectors.EVENT_READ, att)
            return None
        try:
            data = att.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return self.done(att, verdict_of(exc.errno), exc.errno)
        if att.state == "udp":
            if att.token in data:
                self.done(att, CONNECTED)
            return None
        att.buf += data
        if b"\n" in att.buf or not data:
            self.done(att, CONNECTED, peer_host=greeting_host(att.buf))
        return None

    def udp_send(self, att):
        att.tries += 1
        att.next_send = time.monotonic() + self.timeout / self.udp_tries
        try:
            att.sock.send(b"netprobe " + att.token)
        except OSError as exc:
            self.done(att, verdict_of(exc.errno), exc.errno)

    def tick(self, now):
        for att in list(self.active):
            if now >= att.deadline:
                if att.state == "greeting":  # connected, but no netprobe greeting
                    self.done(att, CONNECTED)
                else:
                    self.done(att, TIMEOUT, errno.ETIMEDOUT)
            elif att.state == "udp" and now >= att.next_send and att.tries < self.udp_tries:
                self.udp_send(att)


def greeting_host(buf: bytes):
    try:
        return json.loads(buf.split(b"\n", 1)[0].decode()).get("host")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None


def read_targets(path: str):
    try:
        with open(path) as src:
            lines = [ln.split("#", 1)[0].strip() for ln in src]
    except OSError as exc:
        raise argparse.ArgumentTypeError("cannot read --targets %s: %s" % (path, exc))
    return [target(ln) for ln in lines if ln]


def cmd_connect(args):
    raise_nofile_limit()
    return ConnectRun(args.targets, args.timeout, args.parallel, args.udp_tries).run()


# ---------------------------------------------------------------- mtu

class MtuSearch:
    """Largest DF UDP payload echoed by `serve`, by binary search (few probes)."""

    def __init__(self, host, port, timeout):
        self.family, addr = resolve(host, port, socket.SOCK_DGRAM)
        self.v6 = self.family == socket.AF_INET6
        self.overhead = 48 if self.v6 else 28
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        if self.v6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        self.sock.connect(addr)
        self.timeout = timeout
        self.probes = 0
        self.icmp_seen = False
        self.udp_error = None
        self.lost = []

    def kernel_mtu(self) -> int:
        if self.v6:
            return self.sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        return self.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)

    def probe(self, size: int):
        """-> 'echo', 'lost', or the smaller MTU the kernel/ICMP reported (int)."""
        self.probes += 1
        token = os.urandom(8).hex().encode()
        payload = (token * (size // len(token) + 1))[:size]
        try:
            self.sock.send(payload)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return self.kernel_mtu()
            raise
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.lost.append(size)
                return "lost"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    self.icmp_seen = True
                    return self.kernel_mtu()
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.udp_error = errno_name(exc.errno)  # ICMP unreachable: nobody echoes here
                    return "lost"
                raise
            if data[:len(token)] == token and len(data) == size:
                return "echo"

    def run(self, max_mtu):
        start_mtu = self.kernel_mtu()
        hi = min(max_mtu or start_mtu, start_mtu) - self.overhead
        lo = 64
        if self.reachable(lo) is False:
            return start_mtu, None
        bad = hi + 1
        candidate = hi
        while bad - lo > 1:
            outcome = self.probe(candidate)
            if outcome == "echo":
                lo = candidate
            elif outcome == "lost":
                bad = candidate
            else:  # the kernel knows a smaller MTU (ICMP frag-needed or cached): try exactly that next
                bad = min(bad, candidate)
                cap = outcome - self.overhead
                if lo < cap < bad:
                    candidate = cap
                    continue
            candidate = (lo + bad) // 2
        return start_mtu, lo

    def reachable(self, size):
        for _ in range(3):
            if self.probe(size) == "echo":
                return True
        return False


def tcp_bulk(host, port, mib, timeout) -> dict:
    total = int(mib * 1024 * 1024)
    start = time.monotonic()
    out = {"requested": total, "bytes": 0, "seconds": 0.0, "ok": False, "error": None}
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(max(0.1, timeout - (time.monotonic() - start)))
        sock.sendall(b"\0" * total)
        sock.shutdown(socket.SHUT_WR)
        received = drain_for_receipt(sock, start + timeout)
        sock.close()
        out["bytes"] = received if received is not None else 0
        out["ok"] = received == total
        if received is None:
            out["error"] = "no receipt from netprobe serve"
    except socket.timeout:
        out["error"] = "stalled: timeout after %.1fs" % timeout
    except OSError as exc:
        out["error"] = "%s: %s" % (errno_name(exc.errno), exc.strerror)
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def drain_for_receipt(sock, deadline):
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        data = sock.recv(65535)
        if not data:
            break
        buf += data
    for line in buf.splitlines():
        try:
            doc = json.loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and "received" in doc:
            return doc["received"]
    return None


def mtu_verdict(largest, silent_loss, bulk):
    if largest is None:
        return UNREACHABLE
    if bulk is None:
        return "black_hole" if silent_loss else "ok"
    if bulk["ok"]:
        return "ok"
    return "black_hole" if silent_loss or bulk["bytes"] == 0 else "tcp_failed"


def cmd_mtu(args) -> dict:
    host, port = args.to
    started = time.monotonic()
    try:
        search = MtuSearch(host, port, args.timeout)
        start_mtu, largest = search.run(args.max)
    except OSError as exc:
        raise CannotRun("mtu probe to %s:%d failed: %s" % (host, port, exc))
    silent = largest is not None and any(size > largest for size in search.lost)
    bulk = tcp_bulk(host, port, args.bulk_mib, args.bulk_timeout) if largest and args.bulk_mib else None
    return {"to": "%s:%d" % (host, port), "largest_udp_payload": largest,
            "path_mtu": largest + search.overhead if largest is not None else None,
            "probes": search.probes, "local_route_mtu": start_mtu, "icmp_seen": search.icmp_seen,
            "udp_error": search.udp_error,
            "silent_loss": silent, "tcp_bulk": bulk, "seconds": round(time.monotonic() - started, 3),
            "verdict": mtu_verdict(largest, silent, bulk)}


# ---------------------------------------------------------------- load

class LoadWorker:
    """Open `count` connections at `rate`/s with raw non-blocking sockets, hold, close."""

    def __init__(self, plan):
        self.p = plan
        self.ep = select.epoll()
        self.pending = {}
        self.expiry = deque()
        self.est = {}
        self.ms = []
        self.c = {"established": 0, "timeouts": 0, "refused": 0, "resets": 0, "closed_by_peer": 0,
                  "failed": 0, "held": 0, "opened": 0}
        self.errors = {}
        self.first = self.last = None

    def run(self) -> dict:
        p = self.p
        t0 = time.monotonic()
        open_end = t0 + (p["count"] / p["rate"] if p["rate"] else 0) + p["timeout"] + 30
        while (self.c["opened"] < p["count"] or self.pending) and time.monotonic() < open_end:
            self.open_due(time.monotonic() - t0)
            self.poll(0 if self.c["opened"] < self.due(time.monotonic() - t0) else 0.02)
            self.expire(time.monotonic())
        hold_end = time.monotonic() + p["hold"]
        while time.monotonic() < hold_end:
            self.poll(min(0.2, max(0.0, hold_end - time.monotonic())))
        self.c["held"] = sum(1 for s in self.est.values() if tcp_state(s) == TCP_ESTABLISHED)
        self.close_all()
        self.c["failed"] = p["count"] - self.c["established"]
        return {"counts": self.c, "errors": self.errors, "ms": self.ms, "first": self.first, "last": self.last}

    def due(self, elapsed):
        if not self.p["rate"]:
            return self.p["count"]
        return min(self.p["count"], int(elapsed * self.p["rate"]) + 1)

    def open_due(self, elapsed):
        for _ in range(min(self.due(elapsed) - self.c["opened"], 512)):
            self.open_one(self.c["opened"])
            self.c["opened"] += 1

    def open_one(self, i):
        p = self.p
        family, addr = p["targets"][(i + p["offset"]) % len(p["targets"])]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        now = time.monotonic()
        if self.first is None:
            self.first = now
        try:
            if p["sources"]:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((p["sources"][(i + p["offset"]) % len(p["sources"])], 0))
            err = sock.connect_ex(addr)
        except OSError as exc:
            err = exc.errno
        if err not in (0, errno.EINPROGRESS):
            self.fail(sock, err)
            return
        self.pending[sock.fileno()] = (sock, now)
        self.expiry.append((now + p["timeout"], sock.fileno(), sock))
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def fail(self, sock, err):
        self.errors[errno_name(err)] = self.errors.get(errno_name(err), 0) + 1
        if err == errno.ETIMEDOUT:
            self.c["timeouts"] += 1
        elif err == errno.ECONNREFUSED:
            self.c["refused"] += 1
        sock.close()

    def poll(self, timeout):
        for fd, _ in self.ep.poll(timeout, 1024):
            if fd in self.pending:
                self.on_connected(fd)
            elif fd in self.est:
                self.on_hangup(fd)

    def on_connected(self, fd):
        sock, started = self.pending.pop(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.ep.unregister(fd)
            self.fail(sock, err)
            return
        now = time.monotonic()
        self.ms.append(round((now - started) * 1000.0, 3))
        self.last = now
        self.c["established"] += 1
        self.est[fd] = sock
        # Held connections wake us only when they end (RST -> ERR/HUP, FIN -> RDHUP), not for greetings.
        self.ep.modify(fd, select.EPOLLRDHUP)

    def on_hangup(self, fd):
        sock = self.est.pop(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.c["resets" if err else "closed_by_peer"] += 1
        self.ep.unregister(fd)
        sock.close()

    def expire(self, now):
        while self.expiry and self.expiry[0][0] <= now:
            _, fd, sock = self.expiry.popleft()
            if self.pending.get(fd, (None,))[0] is sock:
                del self.pending[fd]
                self.ep.unregister(fd)
                self.fail(sock, errno.ETIMEDOUT)

    def close_all(self):
        linger = struct.pack("ii", 1, 0)  # abortive close: no TIME_WAIT pile-up across runs
        for sock in list(self.est.values()) + [s for s, _ in self.pending.values()]:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            sock.close()


def tcp_state(sock) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def load_plan(args, cap):
    host, ports = args.to
    try:
        targets = [resolve(host, port) for port in ports]
    except OSError as exc:
        raise CannotRun("cannot resolve %s: %s" % (host, exc))
    workers = args.workers or max(min(os.cpu_count() or 1, math.ceil(args.connections / 1000)),
                                  math.ceil(args.connections / cap))
    share = [args.connections // workers + (1 if i < args.connections % workers else 0) for i in range(workers)]
    return [{"targets": targets, "sources": args.source, "count": n, "rate": args.rate / workers,
             "timeout": args.timeout, "hold": args.hold, "offset": i} for i, n in enumerate(share) if n]


def cmd_load(args) -> dict:
    cap = raise_nofile_limit() - 64
    plans = load_plan(args, cap)
    if any(p["count"] > cap for p in plans):
        raise CannotRun("each worker may hold only %d sockets here: raise --workers" % cap)
    started = time.monotonic()
    results = collect([fork_worker(lambda p=p: LoadWorker(p).run()) for p in plans])
    bad = [r["error"] for r in results if "error" in r]
    if bad:
        raise CannotRun("load worker failed: %s" % bad[0])
    out = {k: sum(r["counts"][k] for r in results)
           for k in ("established", "failed", "resets", "timeouts", "refused", "closed_by_peer", "held")}
    errors = {}
    for r in results:
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
    ms = sorted(m for r in results for m in r["ms"])
    firsts = [r["first"] for r in results if r["first"] is not None]
    lasts = [r["last"] for r in results if r["last"] is not None]
    span = max(lasts) - min(firsts) if lasts and firsts else 0.0
    out.update({"requested": args.connections, "errors": errors, "workers": len(plans),
                "open_rate_per_s": round(out["established"] / span, 1) if span > 0 else 0.0,
                "connect_ms_p50": percentile(ms, 0.50), "connect_ms_p99": percentile(ms, 0.99),
                "open_seconds": round(span, 3), "hold_seconds": args.hold,
                "seconds": round(time.monotonic() - started, 3),
                "to": "%s:%s" % (args.to[0], ",".join(map(str, args.to[1]))), "sources": args.source or []})
    return out


# ---------------------------------------------------------------- facts

def read_text(path: str):
    try:
        with open(path) as src:
            return src.read()
    except OSError:
        return None


def read_sysctl(name: str):
    text = read_text("/proc/sys/" + name.replace(".", "/"))
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def interfaces():
    out = []
    for name in sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []:
        base = "/sys/class/net/%s/" % name
        mtu = read_text(base + "mtu")
        out.append({"name": name, "mtu": int(mtu) if mtu and mtu.strip().isdigit() else None,
                    "operstate": (read_text(base + "operstate") or "").strip() or None})
    return out


def parse_ip_route_default(text: str):
    """First 'default ...' line of `ip route` -> dict(dev, via, mtu) (mtu None if not set on the route)."""
    for line in text.splitlines():
        words = line.split()
        if words[:1] != ["default"]:
            continue
        route = {"dev": None, "via": None, "mtu": None}
        for key, value in zip(words, words[1:] + [""]):
            if key in ("dev", "via"):
                route[key] = value
            elif key == "mtu":
                route["mtu"] = int(value if value != "lock" else words[words.index("lock") + 1])
        return route
    return None


def parse_proc_route_default(text: str):
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 9 and cols[1] == "00000000" and cols[7] == "00000000":
            gw = socket.inet_ntoa(struct.pack("<I", int(cols[2], 16)))
            return {"dev": cols[0], "via": gw if gw != "0.0.0.0" else None, "mtu": int(cols[8]) or None}
    return None


def default_route():
    route, source = None, None
    if shutil.which("ip"):
        res = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True, timeout=10)
        route, source = parse_ip_route_default(res.stdout), "ip route"
    if route is None:
        route, source = parse_proc_route_default(read_text("/proc/net/route") or ""), "/proc/net/route"
    if route is None:
        return None
    route["source"] = source
    dev_mtu = read_text("/sys/class/net/%s/mtu" % route["dev"]) if route["dev"] else None
    route["dev_mtu"] = int(dev_mtu) if dev_mtu and dev_mtu.strip().isdigit() else None
    route["effective_mtu"] = route["mtu"] or route["dev_mtu"]
    return route


def parse_conntrack_stat(text: str):
    """/proc/net/stat/nf_conntrack: a header, one hex row per CPU -> summed counters.
    'entries' is the table size repeated on every row, so it is taken once, not summed."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    header, rows = lines[0], lines[1:]
    sums = {name: 0 for name in header}
    for row in rows:
        for name, value in zip(header, row):
            sums[name] += int(value, 16)
    if "entries" in sums and rows:
        sums["entries"] = int(rows[0][header.index("entries")], 16)
    return sums


def parse_snmp(text: str, prefix: str = "Ip"):
    """/proc/net/snmp: pairs of 'Ip: names' / 'Ip: values' lines -> {name: int}."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(prefix + ":")]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0][1:], (int(v) for v in rows[1][1:])))


def ip_fragment_counters():
    ip = parse_snmp(read_text("/proc/net/snmp") or "")
    out = {k: v for k, v in ip.items() if k.startswith(("Frag", "Reasm"))}
    for line in (read_text("/proc/net/snmp6") or "").splitlines():
        cols = line.split()
        if len(cols) == 2 and cols[0].startswith(("Ip6Frag", "Ip6Reasm")):
            out[cols[0]] = int(cols[1])
    return out


def kube_proxy_running() -> bool:
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        comm = (read_text("/proc/%s/comm" % pid) or "").strip()
        cmdline = (read_text("/proc/%s/cmdline" % pid) or "").split("\0")[0]
        if comm == "kube-proxy" or os.path.basename(cmdline) == "kube-proxy":
            return True
    return False


def kube_services_rules():
    """KUBE-SERVICES in iptables-save, or kube-proxy's tables in `nft list ruleset`; None when unknown."""
    sources = {}
    for tool, cmd in (("iptables-save", ["iptables-save"]), ("nft", ["nft", "list", "ruleset"])):
        if not shutil.which(cmd[0]):
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            sources[tool] = None
            continue
        text = res.stdout
        sources[tool] = None if res.returncode else (
            "KUBE-SERVICES" in text or "table ip kube-proxy" in text or "table ip6 kube-proxy" in text)
    known = [v for v in sources.values() if v is not None]
    return {"present": any(known) if known else None, "sources": sources}


def cmd_facts(_args) -> dict:
    stat = read_text("/proc/net/stat/nf_conntrack")
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "sysctls": {name: read_sysctl(name) for name in TUNING_SYSCTLS},
        "interfaces": interfaces(),
        "default_route": default_route(),
        "conntrack": {"count": read_sysctl("net.netfilter.nf_conntrack_count"),
                      "max": read_sysctl("net.netfilter.nf_conntrack_max"),
                      "stat": parse_conntrack_stat(stat) if stat else None},
        "ip_fragments": ip_fragment_counters(),
        "kube_proxy_running": kube_proxy_running(),
        "kube_services_rules": kube_services_rules(),
    }


# ---------------------------------------------------------------- main

class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        emit({"error": message})
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="netprobe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{serve,connect,mtu,load,facts}")

    s = sub.add_parser("serve", help="TCP greeter/sink and UDP echo; runs until killed")
    s.add_argument("--tcp", type=port_list, default=[], help="comma-separated TCP ports")
    s.add_argument("--udp", type=port_list, default=[], help="comma-separated UDP ports")
    s.add_argument("--bind", help="address to bind (default: all, dual-stack)")
    s.add_argument("--ready-file", help="written (JSON) once listening")
    s.add_argument("--workers", type=positive(int), default=4, help="processes, each with SO_REUSEPORT listeners")
    s.add_argument("--backlog", type=positive(int), default=65535)

    c = sub.add_parser("connect", help="verdict per target")
    c.add_argument("--to", type=target, action="append", default=[], dest="targets", help="HOST:PORT/PROTO")
    c.add_argument("--targets", type=read_targets, dest="target_file", help="file with one HOST:PORT/PROTO a line")
    c.add_argument("--timeout", type=positive(float), default=2.0, help="seconds per target")
    c.add_argument("--parallel", type=positive(int), default=128)
    c.add_argument("--udp-tries", type=positive(int), default=3, help="UDP sends within the timeout")

    m = sub.add_parser("mtu", help="path MTU by DF UDP binary search, then a TCP bulk transfer")
    m.add_argument("--to", type=host_port, required=True, help="HOST:PORT where serve has TCP and UDP")
    m.add_argument("--max", type=int, default=0, help="largest packet size (bytes) to try; default: route MTU")
    m.add_argument("--bulk-mib", type=non_negative, default=2.0, help="TCP transfer size (0 = skip)")
    m.add_argument("--bulk-timeout", type=positive(float), default=5.0)
    m.add_argument("--timeout", type=positive(float), default=0.5, help="seconds to wait for each echo")

    ld = sub.add_parser("load", help="open, hold and close many TCP connections")
    ld.add_argument("--to", type=host_ports, required=True, help="HOST:PORT[,PORT...]")
    ld.add_argument("--connections", type=positive(int), required=True)
    ld.add_argument("--rate", type=non_negative, default=0.0, help="opens per second (0 = as fast as possible)")
    ld.add_argument("--hold", type=non_negative, default=1.0, help="seconds to hold")
    ld.add_argument("--timeout", type=positive(float), default=3.0, help="connect timeout, seconds")
    ld.add_argument("--source", type=lambda t: [a.strip() for a in t.split(",") if a.strip()], default=None,
                    help="comma-separated local source addresses, used round-robin")
    ld.add_argument("--workers", type=positive(int), default=0, help="processes (default: from N and the fd limit)")

    sub.add_parser("facts", help="sysctls, MTUs, conntrack and fragment counters, kube-proxy presence")
    return parser


def check_args(parser, args):
    if args.cmd == "connect":
        args.targets = args.targets + (args.target_file or [])
        if not args.targets:
            parser.error("connect: give at least one --to HOST:PORT/PROTO or --targets FILE")
    if args.cmd == "mtu" and args.max and not 68 <= args.max <= 65535:
        parser.error("mtu: --max is the largest packet size in bytes (68..65535), got %d" % args.max)
    if args.cmd == "load" and args.connections > 1_000_000:
        parser.error("load: --connections is capped at 1000000")


COMMANDS = {"serve": cmd_serve, "connect": cmd_connect, "mtu": cmd_mtu, "load": cmd_load, "facts": cmd_facts}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        emit(COMMANDS[args.cmd](args))
    except CannotRun as exc:
        sys.stderr.write("netprobe %s: %s\n" % (args.cmd, exc))
        emit({"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
