#!/usr/bin/env python3
"""netprobe: measure what the network conformance checks judge.

One stdlib-only file (Python 3.9+) that runs unchanged in a pod, on a node and
in our netns tests. Every subcommand prints ONE JSON document on stdout.
Exit codes: 0 the probe ran (whatever it found), 2 bad arguments, 1 could not run.

  serve   --tcp PORTS --udp PORTS --http PORTS [--bind ADDR] [--ready-file F] [--workers W]
  connect --to HOST:PORT/PROTO [--to ...] [--targets FILE] --timeout S --parallel N
          PROTO: tcp (netprobe greeting), udp (netprobe echo), dns (a DNS query over UDP),
          dns-tcp (the same over TCP), http (GET /; `serve --http` names its host in the body)
          [--dns-name NAME] [--dns-type A|AAAA]
  mtu     --to HOST:PORT [--max BYTES] [--bulk-mib N] [--bulk-timeout S] [--timeout S] [--retries N]
  load    --to HOST:PORT[,PORT...] --connections N --rate R --hold S --timeout S [--source A,B]
          [--verify-timeout S]: at the end of the hold one byte goes out on each held connection;
          `verified` counts those whose byte `serve --tcp` echoed back
  facts
  arp     --iface IF --ip VIP [--count N] [--interval S] [--window S]
          ARP who-has VIP on a raw AF_PACKET socket (needs CAP_NET_RAW); every reply in the window, by
          responder MAC (not the neighbour table), so two nodes answering for one VIP are seen

A probe that could not measure says so (an "error" verdict or an "errors" entry with its
message); it never turns a missing measurement into a verdict, a zero or "no change".
"""
from __future__ import annotations

import argparse
import errno
import fcntl
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
#: `load` sends this one byte on every held connection at the end of the hold; `serve --tcp` answers a
#: connection whose first data is exactly this byte with the same byte (bulk data is NUL bytes, the greeting is
#: JSON, which escapes control characters: neither can be mistaken for it).
VERIFY_BYTE = b"\x06"

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


PROTOS = ("tcp", "udp", "dns", "dns-tcp", "http")
STREAM_PROTOS = ("tcp", "dns-tcp", "http")


def target(text: str):
    """HOST:PORT/PROTO -> dict(to, host, port, proto); PROTO is one of PROTOS."""
    hp, sep, proto = text.strip().rpartition("/")
    proto = proto.lower()
    if not sep or proto not in PROTOS:
        raise argparse.ArgumentTypeError("expected HOST:PORT/tcp, /udp, /dns, /dns-tcp or /http, got %r" % text)
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


SERVE_COUNTERS = ("accepted", "tcp_bytes", "udp_echoed", "udp_errors", "max_open", "accept_errors",
                  "greet_errors", "http_requests", "http_bad_requests", "verify_answered")
HTTP_MAX_REQUEST = 16384


class ServeWorker:
    """One process: its own SO_REUSEPORT listeners, an epoll loop, many held connections.

    TCP (--tcp): greets with a JSON line naming the host, then sinks bytes and confirms the count at EOF; a
    connection whose first data is exactly VERIFY_BYTE gets that byte back (`load`'s end-to-end check).
    HTTP (--http): answers each GET with a JSON body naming the host, then closes."""

    def __init__(self, listeners, udp_socks, http_listeners=()):
        self.sel = selectors.DefaultSelector()
        self.host = socket.gethostname()
        self.stats = dict.fromkeys(SERVE_COUNTERS, 0)
        self.open = {}
        self.paused = []
        self.stop = False
        self.http_fds = {sock.fileno() for sock in http_listeners}
        for sock in list(listeners) + list(http_listeners):
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
            if lsock.fileno() in self.http_fds:
                self.hold(conn, addr, lsock.getsockname()[1], "http")
            else:
                self.greet(conn, addr, lsock.getsockname()[1])

    def hold(self, conn, addr, port, kind):
        conn.setblocking(False)
        self.stats["accepted"] += 1
        self.open[conn.fileno()] = [conn, 0, b"", peer_text(addr), port]
        self.stats["max_open"] = max(self.stats["max_open"], len(self.open))
        self.sel.register(conn, selectors.EVENT_READ, kind)

    def greet(self, conn, addr, port):
        line = json.dumps({"host": self.host, "peer": peer_text(addr), "port": port}) + "\n"
        try:
            conn.send(line.encode())
        except OSError:
            self.stats["greet_errors"] += 1
            conn.close()
            return
        self.hold(conn, addr, port, "conn")

    def close_conn(self, conn):
        self.sel.unregister(conn)
        del self.open[conn.fileno()]
        conn.close()

    def on_http(self, conn):
        entry = self.open[conn.fileno()]
        try:
            data = conn.recv(HTTP_MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        entry[2] += data
        head, sep, _ = entry[2].partition(b"\r\n\r\n")
        if not sep and data and len(entry[2]) <= HTTP_MAX_REQUEST:
            return  # wait for the rest of the header
        words = head.split(b"\r\n", 1)[0].split()
        if sep and len(words) == 3 and words[0] in (b"GET", b"HEAD"):
            self.stats["http_requests"] += 1
            body = (json.dumps({"host": self.host, "peer": entry[3], "port": entry[4],
                                "path": words[1].decode("latin-1")}) + "\n").encode()
            status = b"200 OK"
        elif not entry[2]:  # closed without a request
            return self.close_conn(conn)
        else:
            self.stats["http_bad_requests"] += 1
            body, status = b'{"error": "bad request"}\n', b"400 Bad Request"
        reply = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(reply + (body if words[:1] != [b"HEAD"] else b""))
        except OSError:
            self.stats["greet_errors"] += 1
        self.close_conn(conn)

    def on_conn(self, conn):
        entry = self.open[conn.fileno()]
        try:
            data = conn.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if data:
            if entry[1] == 0 and data == VERIFY_BYTE:
                self.stats["verify_answered"] += 1
                try:
                    conn.send(VERIFY_BYTE)
                except OSError:
                    self.stats["greet_errors"] += 1
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
            except OSError:  # e.g. ICMP unreachable from an earlier echo: count it, keep serving
                self.stats["udp_errors"] += 1
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
    if not args.tcp and not args.udp and not args.http:
        raise CannotRun("nothing to serve: give --tcp, --udp and/or --http")
    try:
        sets = [[listen_tcp(bind, p, args.backlog) for p in args.tcp] for _ in range(args.workers)]
        http_sets = [[listen_tcp(bind, p, args.backlog) for p in args.http] for _ in range(args.workers)]
        udp = [bind_udp(bind, p) for p in args.udp]
    except OSError as exc:
        raise CannotRun("cannot listen on %s: %s" % (bind, exc))
    listening = {"bind": bind, "tcp": args.tcp, "udp": args.udp, "http": args.http, "workers": args.workers,
                 "backlog": args.backlog, "pid": os.getpid()}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    workers = []
    for i, mine in enumerate(sets):
        body = lambda mine=mine, i=i: ServeWorker(mine, udp if i == 0 else [], http_sets[i]).run()
        workers.append(fork_worker(body))
    for sock in [s for group in sets + http_sets for s in group] + udp:
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
    totals = {k: sum(r[k] for r in results if "error" not in r) for k in SERVE_COUNTERS}
    totals["listening"] = listening
    totals["worker_errors"] = [r["error"] for r in results if "error" in r]
    return totals


# ---------------------------------------------------------------- connect

DNS_TYPES = {"A": 1, "AAAA": 28}
DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
HTTP_MAX_REPLY = 65536


def dns_query(name: str, qtype: int, qid: int) -> bytes:
    """A standard recursive query for one name (RFC 1035 4.1)."""
    qname = b""
    for label in (part for part in name.rstrip(".").split(".") if part):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if len(raw) > 63:
            raise ValueError("DNS label longer than 63 bytes: %r" % label)
        qname += bytes([len(raw)]) + raw
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0" + struct.pack("!HH", qtype, 1)


def dns_skip_name(data: bytes, offset: int) -> int:
    """Offset just past a (possibly compressed) name; ValueError when malformed."""
    for _ in range(128):
        if offset >= len(data):
            raise ValueError("name runs past the message")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length & 0xC0:
            raise ValueError("bad label type 0x%x" % length)
        offset += 1 + length
    raise ValueError("name has too many labels")


def parse_dns_reply(data: bytes, query: bytes):
    """The reply to `query` -> dict(rcode, truncated, answers); None when `data` is not that reply;
    ValueError when it is that reply but malformed."""
    if len(data) < 12 or data[:2] != query[:2] or not data[2] & 0x80:
        return None
    question = query[12:]
    if data[12:12 + len(question)].lower() != question.lower():
        return None
    flags, qdcount, ancount = struct.unpack_from("!HHH", data, 2)
    offset = 12 + len(question)
    answers = []
    for _ in range(min(ancount, 256)):
        offset = dns_skip_name(data, offset)
        if offset + 10 > len(data):
            raise ValueError("answer record runs past the message")
        rtype, _cls, _ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        rdata = data[offset + 10:offset + 10 + rdlength]
        if len(rdata) != rdlength:
            raise ValueError("answer data runs past the message")
        offset += 10 + rdlength
        if rtype == 1 and rdlength == 4:
            answers.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28 and rdlength == 16:
            answers.append(socket.inet_ntop(socket.AF_INET6, rdata))
    rcode = flags & 0xF
    return {"rcode": DNS_RCODES.get(rcode, str(rcode)), "truncated": bool(flags & 0x0200), "answers": answers}


def http_request(host: str, port: int) -> bytes:
    hostname = "[%s]" % host if ":" in host else host
    return ("GET / HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: netprobe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            % (hostname, port)).encode()


def parse_http_reply(buf: bytes, complete: bool):
    """-> dict(status, body, ...) once a whole response is in buf (or complete: EOF seen); None: need more.
    ValueError: what arrived is not HTTP."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        if complete or len(buf) > HTTP_MAX_REPLY:
            raise ValueError("no HTTP response header in %d bytes" % len(buf))
        if not b"HTTP/".startswith(buf[:5]):
            raise ValueError("not an HTTP response: %r" % buf[:40])
        return None
    lines = head.decode("iso-8859-1").split("\r\n")
    words = lines[0].split(" ", 2)
    if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
        raise ValueError("not an HTTP status line: %r" % lines[0][:80])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        if len(body) < int(length) and not complete:
            return None
        body = body[:int(length)]
    elif not complete:
        return None  # body ends at EOF (we asked for Connection: close)
    return {"status": int(words[1]), "reason": words[2] if len(words) > 2 else "",
            "body": body[:512].decode("utf-8", "replace"), "bytes": len(body)}


def body_host(text: str):
    """`serve --http` answers a JSON body naming its host."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc.get("host") if isinstance(doc, dict) else None


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
        self.request = b""

    def finish(self, verdict, err=0, peer_host=None, detail=None, extra=None):
        if self.ms is None:
            self.ms = (time.monotonic() - self.start) * 1000.0
        self.result = {"to": self.tgt["to"], "proto": self.tgt["proto"], "verdict": verdict,
                       "ms": round(self.ms, 3), "peer_host": peer_host, "tries": max(self.tries, 1),
                       "errno": errno_name(err) or None, "error": detail or (os.strerror(err) if err else None)}
        if extra:
            self.result.update(extra)
        if self.sock is not None:
            self.sock.close()


class ConnectRun:
    """All attempts in one epoll loop, at most `parallel` in flight.

    tcp: connected once the handshake completes (peer_host from netprobe's greeting when one comes).
    udp: connected once netprobe serve echoes our token. dns / dns-tcp: connected once the server answers
    our query (any rcode: the flow passed; the answer is under "dns"). http: connected once an HTTP
    response arrives (under "http"); a handshake without a response before the deadline is a timeout."""

    def __init__(self, targets, timeout, parallel, udp_tries, dns_name="kubernetes.default.svc.cluster.local",
                 dns_type="A"):
        self.todo = deque(Attempt(t) for t in targets)
        self.all = list(self.todo)
        self.timeout, self.parallel, self.udp_tries = timeout, parallel, udp_tries
        self.dns_name, self.dns_type = dns_name, dns_type
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
                if key.data in self.active:
                    self.on_event(key.data)
            self.tick(time.monotonic())
        return [a.result for a in self.all]

    def begin(self, att):
        att.start = time.monotonic()
        att.deadline = att.start + self.timeout
        proto = att.tgt["proto"]
        if proto in ("dns", "dns-tcp"):
            try:
                att.request = dns_query(self.dns_name, DNS_TYPES[self.dns_type], int.from_bytes(os.urandom(2), "big"))
            except (ValueError, UnicodeError) as exc:
                return att.finish(ERROR, detail="dns query: %s" % exc)
            if proto == "dns-tcp":
                att.request = struct.pack("!H", len(att.request)) + att.request
        elif proto == "http":
            att.request = http_request(att.tgt["host"], att.tgt["port"])
        else:
            att.request = b"netprobe " + att.token
        try:
            family, addr = resolve(att.tgt["host"], att.tgt["port"])
            kind = socket.SOCK_STREAM if proto in STREAM_PROTOS else socket.SOCK_DGRAM
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
        if proto in STREAM_PROTOS:
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
        proto = att.tgt["proto"]
        if att.state == "connecting":
            err = att.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.done(att, verdict_of(err), err)
            att.ms = (time.monotonic() - att.start) * 1000.0
            att.state = "greeting" if proto == "tcp" else "reply"
            if proto != "tcp":
                att.tries = 1
                try:
                    att.sock.send(att.request)  # small: fits the fresh socket's send buffer
                except OSError as exc:
                    return self.done(att, verdict_of(exc.errno), exc.errno)
            self.sel.modify(att.sock, selectors.EVENT_READ, att)
            return None
        try:
            data = att.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return self.done(att, verdict_of(exc.errno), exc.errno)
        if proto == "udp":
            if att.token in data:
                self.done(att, CONNECTED)
            return None
        if proto == "dns":
            return self.on_dns(att, data)
        att.buf += data
        if proto == "tcp":
            if b"\n" in att.buf or not data:
                self.done(att, CONNECTED, peer_host=greeting_host(att.buf))
            return None
        if proto == "dns-tcp":
            if len(att.buf) >= 2 and len(att.buf) >= 2 + struct.unpack("!H", att.buf[:2])[0]:
                return self.on_dns(att, att.buf[2:])
            if not data:
                return self.done(att, ERROR, detail="connection closed before a whole DNS reply (%d bytes)"
                                 % len(att.buf))
            return None
        return self.on_http(att, complete=not data)

    def on_dns(self, att, data):
        query = att.request[2:] if att.tgt["proto"] == "dns-tcp" else att.request
        try:
            reply = parse_dns_reply(data, query)
        except ValueError as exc:
            return self.done(att, ERROR, detail="malformed DNS reply: %s" % exc)
        if reply is None:
            if att.tgt["proto"] == "dns-tcp":
                return self.done(att, ERROR, detail="TCP reply does not answer our DNS query")
            return None  # a stray datagram: keep waiting for ours
        reply.update({"name": self.dns_name, "type": self.dns_type})
        return self.done(att, CONNECTED, extra={"dns": reply})

    def on_http(self, att, complete):
        try:
            reply = parse_http_reply(att.buf, complete)
        except ValueError as exc:
            return self.done(att, ERROR, detail=str(exc))
        if reply is not None:
            self.done(att, CONNECTED, peer_host=body_host(reply["body"]), extra={"http": reply})
        return None

    def udp_send(self, att):
        att.tries += 1
        att.next_send = time.monotonic() + self.timeout / self.udp_tries
        try:
            att.sock.send(att.request)
        except OSError as exc:
            self.done(att, verdict_of(exc.errno), exc.errno)

    def tick(self, now):
        for att in list(self.active):
            if now >= att.deadline:
                if att.state == "greeting":  # connected, but no netprobe greeting
                    self.done(att, CONNECTED)
                elif att.state == "reply":  # connected, but the service never answered
                    what = "HTTP response" if att.tgt["proto"] == "http" else "DNS reply"
                    self.done(att, TIMEOUT, errno.ETIMEDOUT,
                              detail="TCP connected, no %s within %gs" % (what, self.timeout))
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
    return ConnectRun(args.targets, args.timeout, args.parallel, args.udp_tries, args.dns_name,
                      args.dns_type).run()


# ---------------------------------------------------------------- mtu

BULK_TIMEOUT_FLOOR = 5.0  # seconds: the old fixed timeout is the least any transfer gets
BULK_TIMEOUT_CAP = 120.0
BULK_RTT_FACTOR = 8  # RTTs allowed per slow-start round (room for retransmissions)


def bulk_timeout_for(rtt_s, nbytes, mss=1400):
    """Seconds a bulk transfer of nbytes may take: slow start from IW10 needs about
    log2(segments/10) round trips; allow BULK_RTT_FACTOR RTTs per round on top of a floor, capped."""
    if rtt_s is None:
        return BULK_TIMEOUT_FLOOR
    segments = max(1, math.ceil(nbytes / mss))
    rounds = math.ceil(math.log2(segments / 10.0 + 1)) + 1
    return round(min(BULK_TIMEOUT_CAP, BULK_TIMEOUT_FLOOR + BULK_RTT_FACTOR * rounds * rtt_s), 3)


class MtuSearch:
    """Largest DF UDP payload echoed by `serve`, by binary search (few probes).
    A size that gets no echo is sent again, up to `tries` times, before it counts as lost."""

    def __init__(self, host, port, timeout, tries=3):
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
        self.tries = tries
        self.probes = 0  # datagrams sent
        self.sizes = 0  # sizes tried
        self.retried = 0  # datagrams sent again because a size got no echo
        self.icmp_seen = False
        self.udp_error = None
        self.lost = []
        self.rtts = []

    def kernel_mtu(self) -> int:
        if self.v6:
            return self.sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        return self.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)

    def probe(self, size: int):
        """-> 'echo', 'lost' (no echo after `tries` sends), or the smaller MTU the kernel/ICMP reported (int)."""
        self.sizes += 1
        for attempt in range(self.tries):
            if attempt:
                self.retried += 1
            outcome = self.send_once(size)
            if outcome != "lost" or self.udp_error:
                break
        if outcome == "lost":
            self.lost.append(size)
        return outcome

    def send_once(self, size: int):
        self.probes += 1
        token = os.urandom(8).hex().encode()
        payload = (token * (size // len(token) + 1))[:size]
        sent = time.monotonic()
        try:
            self.sock.send(payload)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return self.kernel_mtu()
            raise
        deadline = sent + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
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
                self.rtts.append(time.monotonic() - sent)
                return "echo"

    def run(self, max_mtu):
        start_mtu = self.kernel_mtu()
        hi = min(max_mtu or start_mtu, start_mtu) - self.overhead
        lo = 64
        if self.probe(lo) != "echo":
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

    def rtt(self):
        """The slowest echo seen (seconds), None without one: a conservative base for timeouts."""
        return max(self.rtts) if self.rtts else None


def tcp_bulk(host, port, mib, timeout) -> dict:
    """Send mib MiB to `serve`, half-close, wait for its receipt. `verdict` says what happened, in
    connect's words: connected (the receipt came back), refused / unreachable / timeout / error at
    `stage` connect, reset, or timeout (stalled) at stage send or receipt."""
    total = int(mib * 1024 * 1024)
    start = time.monotonic()
    out = {"requested": total, "bytes": 0, "seconds": 0.0, "ok": False, "error": None, "errno": None,
           "stage": "connect", "verdict": None, "timeout": timeout}
    sock = None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        out["stage"] = "send"
        sock.settimeout(max(0.1, timeout - (time.monotonic() - start)))
        sock.sendall(b"\0" * total)
        sock.shutdown(socket.SHUT_WR)
        out["stage"] = "receipt"
        received, closed = drain_for_receipt(sock, start + timeout)
        if received is None:
            out["verdict"] = ERROR if closed else TIMEOUT
            out["error"] = ("peer closed without a receipt (not netprobe serve?)" if closed
                            else "stalled: no receipt after %.1fs" % timeout)
        else:
            out["bytes"] = received
            out["ok"] = received == total
            out["verdict"] = CONNECTED
            out["stage"] = None if out["ok"] else "receipt"
            if not out["ok"]:
                out["error"] = "peer received %d of %d bytes" % (received, total)
    except socket.timeout:
        out["verdict"] = TIMEOUT
        out["errno"] = "ETIMEDOUT"
        out["error"] = "stalled: timeout after %.1fs" % timeout
    except OSError as exc:
        out["verdict"] = verdict_of(exc.errno)
        out["errno"] = errno_name(exc.errno) or None
        out["error"] = "%s: %s" % (errno_name(exc.errno), exc.strerror)
    finally:
        if sock is not None:
            sock.close()
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def drain_for_receipt(sock, deadline):
    """-> (bytes the peer confirmed or None, whether the peer closed). socket.timeout propagates."""
    buf = b""
    closed = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        data = sock.recv(65535)
        if not data:
            closed = True
            break
        buf += data
    for line in buf.splitlines():
        try:
            doc = json.loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and "received" in doc:
            return doc["received"], closed
    return None, closed


def mtu_verdict(largest, silent_loss, bulk):
    """ok | black_hole | tcp_failed, or what stopped the measurement: unreachable (no UDP echo at all),
    refused / unreachable / timeout / error (the bulk TCP connection never opened), reset.
    black_hole only when a connected transfer stalled and large datagrams vanished (or nothing arrived)."""
    if largest is None:
        return UNREACHABLE
    if bulk is None:
        return "black_hole" if silent_loss else "ok"
    if bulk["ok"]:
        return "ok"
    if bulk.get("stage") == "connect":
        return bulk.get("verdict") or ERROR
    if bulk.get("verdict") == RESET:
        return RESET
    if bulk.get("verdict") == TIMEOUT and (silent_loss or bulk["bytes"] == 0):
        return "black_hole"
    return "tcp_failed"


def cmd_mtu(args) -> dict:
    host, port = args.to
    started = time.monotonic()
    try:
        search = MtuSearch(host, port, args.timeout, args.retries + 1)
        start_mtu, largest = search.run(args.max)
    except OSError as exc:
        raise CannotRun("mtu probe to %s:%d failed: %s" % (host, port, exc))
    silent = largest is not None and any(size > largest for size in search.lost)
    rtt = search.rtt()
    nbytes = int(args.bulk_mib * 1024 * 1024)
    bulk_timeout = args.bulk_timeout or bulk_timeout_for(rtt, nbytes, (largest or 1400) - 12)
    bulk = tcp_bulk(host, port, args.bulk_mib, bulk_timeout) if largest and args.bulk_mib else None
    return {"to": "%s:%d" % (host, port), "largest_udp_payload": largest,
            "path_mtu": largest + search.overhead if largest is not None else None,
            "probes": search.probes, "sizes_tried": search.sizes, "retried": search.retried,
            "lost_sizes": sorted(set(search.lost)),
            "rtt_ms": round(rtt * 1000.0, 3) if rtt is not None else None,
            "bulk_timeout": bulk_timeout, "bulk_timeout_from": "option" if args.bulk_timeout else "rtt",
            "local_route_mtu": start_mtu, "icmp_seen": search.icmp_seen,
            "udp_error": search.udp_error,
            "silent_loss": silent, "tcp_bulk": bulk, "seconds": round(time.monotonic() - started, 3),
            "verdict": mtu_verdict(largest, silent, bulk)}


# ---------------------------------------------------------------- load

class LoadWorker:
    """Open `count` connections at `rate`/s with raw non-blocking sockets, hold, verify, close.

    Verify: at the end of the hold, VERIFY_BYTE goes out on every connection still ESTABLISHED, and one counts
    as `verified` once that byte comes back (`serve --tcp` echoes it) within `verify_timeout` seconds: proof the
    datapath still carries the flow end to end, not only that the client's socket believes it is open."""

    def __init__(self, plan):
        self.p = plan
        self.ep = select.epoll()
        self.pending = {}
        self.expiry = deque()
        self.est = {}
        self.ms = []
        self.c = {"established": 0, "timeouts": 0, "refused": 0, "resets": 0, "closed_by_peer": 0,
                  "failed": 0, "held": 0, "opened": 0, "verify_sent": 0, "verified": 0, "verify_timeouts": 0,
                  "verify_closed": 0, "not_opened": 0, "unfinished": 0}
        self.errors = {}
        self.first = self.last = None

    def run(self) -> dict:
        p = self.p
        t0 = time.monotonic()
        open_end = t0 + (p["count"] / p["rate"] if p["rate"] else 0) + p["timeout"] + p["open_slack"]
        while (self.c["opened"] < p["count"] or self.pending) and time.monotonic() < open_end:
            self.open_due(time.monotonic() - t0)
            self.poll(0 if self.c["opened"] < self.due(time.monotonic() - t0) else 0.02)
            self.expire(time.monotonic())
        # The window closed on this client, not on the datapath: every socket opened in time has expired by
        # then unless this loop fell behind (a starved client). What it left is counted apart from timeouts.
        self.c["not_opened"] = p["count"] - self.c["opened"]
        self.c["unfinished"] = len(self.pending)
        for fd, (sock, _) in list(self.pending.items()):
            self.ep.unregister(fd)
            sock.close()
        self.pending.clear()
        hold_end = time.monotonic() + p["hold"]
        while time.monotonic() < hold_end:
            self.poll(min(0.2, max(0.0, hold_end - time.monotonic())))
        self.c["held"] = sum(1 for s in self.est.values() if tcp_state(s) == TCP_ESTABLISHED)
        self.verify()
        self.close_all()
        self.c["failed"] = p["count"] - self.c["established"]
        return {"counts": self.c, "errors": self.errors, "ms": self.ms, "first": self.first, "last": self.last}

    def verify(self):
        waiting = {}
        for fd, sock in self.est.items():
            if tcp_state(sock) != TCP_ESTABLISHED:  # not held: already counted, no events from it from now on
                self.ep.unregister(fd)
                continue
            try:
                sock.send(VERIFY_BYTE)
            except OSError:
                self.c["verify_closed"] += 1
                self.ep.unregister(fd)
                continue
            waiting[fd] = sock
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.c["verify_sent"] = len(waiting)
        deadline = time.monotonic() + self.p["verify_timeout"]
        while waiting and time.monotonic() < deadline:
            for fd, _ in self.ep.poll(min(0.2, max(0.0, deadline - time.monotonic())), 1024):
                sock = waiting.get(fd)
                if sock is None:
                    continue
                try:
                    data = sock.recv(65536)  # the greeting (never read during the hold) comes first
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if VERIFY_BYTE in data or not data:
                    self.c["verified" if data else "verify_closed"] += 1
                    del waiting[fd]
                    self.ep.unregister(fd)
        self.c["verify_timeouts"] = len(waiting)

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
             "timeout": args.timeout, "hold": args.hold, "offset": i, "verify_timeout": args.verify_timeout,
             "open_slack": args.open_slack}
            for i, n in enumerate(share) if n]


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
           for k in ("established", "failed", "resets", "timeouts", "refused", "closed_by_peer", "held",
                     "verify_sent", "verified", "verify_timeouts", "verify_closed", "not_opened", "unfinished")}
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
                "open_seconds": round(span, 3), "hold_seconds": args.hold, "verify_timeout": args.verify_timeout,
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


def read_text_or_error(path: str):
    """-> (text, None) or (None, message)."""
    try:
        with open(path) as src:
            return src.read(), None
    except OSError as exc:
        return None, "cannot read %s: %s" % (path, exc.strerror or exc)


def read_sysctl(name: str):
    text = read_text("/proc/sys/" + name.replace(".", "/"))
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


class Facts:
    """Collects what `facts` could not read: every missing value is an entry in "errors", never a zero."""

    def __init__(self):
        self.errors = []

    def error(self, what: str, message: str):
        self.errors.append({"what": what, "error": message})

    def counter(self, name: str):
        """A sysctl that is a counter/limit: an int, or None with an error entry."""
        path = "/proc/sys/" + name.replace(".", "/")
        text, err = read_text_or_error(path)
        if text is None:
            self.error(name, err)
            return None
        if not text.strip().isdigit():
            self.error(name, "%s holds %r, not a number" % (path, text[:40]))
            return None
        return int(text)

    def parsed(self, what: str, path: str, parse):
        """parse(text of path), or None with an error entry when unreadable or unparsable."""
        text, err = read_text_or_error(path)
        if text is None:
            self.error(what, err)
            return None
        try:
            return parse(text)
        except (ValueError, IndexError, KeyError) as exc:
            self.error(what, "cannot parse %s: %s" % (path, exc))
            return None


def interfaces(facts: Facts = None):
    """Every link: name, MTU, operstate, MAC (/sys/class/net/<if>/address) and its IPv4 addresses as "a.b.c.d/len"
    (rtnetlink RTM_GETADDR; None with an "errors" entry when the dump fails). The suite maps a node's InternalIP
    to the MAC of the link holding it: the MAC that answers ARP on the lab network."""
    addrs, addr_error = {}, None
    try:
        for entry in rtnl_addrs_v4():
            addrs.setdefault(entry["index"], []).append("%s/%d" % (entry["address"], entry["prefixlen"]))
    except (OSError, ValueError, struct.error) as exc:
        addr_error = "rtnetlink address dump failed: %s" % exc
        if facts is not None:
            facts.error("interfaces.ipv4", addr_error)
    out = []
    for name in sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []:
        base = "/sys/class/net/%s/" % name
        mtu = read_text(base + "mtu")
        index = read_text(base + "ifindex")
        index = int(index) if index and index.strip().isdigit() else None
        out.append({"name": name, "mtu": int(mtu) if mtu and mtu.strip().isdigit() else None,
                    "operstate": (read_text(base + "operstate") or "").strip() or None,
                    "mac": (read_text(base + "address") or "").strip().lower() or None,
                    "ipv4": None if addr_error else sorted(addrs.get(index, []))})
    return out


# rtnetlink (linux/netlink.h, linux/rtnetlink.h): enough to dump IPv4 routes without `ip`.
NLMSG_ERROR, NLMSG_DONE, NLM_F_REQUEST, NLM_F_DUMP = 2, 3, 0x1, 0x300
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 8, 9, 15
RTAX_MTU, RT_TABLE_MAIN, RTN_UNICAST = 2, 254, 1
# Addresses only a default route covers in a sane routing table (TEST-NET-1..3, RFC 5737). Connecting a UDP
# socket to one sends nothing: it only makes the kernel pick the route, whose MTU IP_MTU then reports.
ROUTE_PROBE_ADDRS = ("192.0.2.1", "198.51.100.1", "203.0.113.1")


def nl_attrs(data: bytes, offset: int = 0):
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            raise ValueError("netlink attribute of length %d" % length)
        yield kind & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def nl_dump_bodies(data: bytes, kind_wanted: int):
    """The bodies of the ``kind_wanted`` messages in one read of a netlink dump -> (bodies, done).
    OSError for an NLMSG_ERROR; ValueError for a malformed message."""
    bodies, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            raise ValueError("netlink message of length %d at %d of %d" % (length, offset, len(data)))
        body = data[offset + 16:offset + length]
        offset += (length + 3) & ~3
        if kind == NLMSG_DONE:
            return bodies, True
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0]
            if err:
                raise OSError(err, "rtnetlink: %s" % os.strerror(err))
            continue
        if kind != kind_wanted:
            continue
        bodies.append(body)
    return bodies, False


def rtnl_dump(request_type: int, payload: bytes, parse, timeout: float, max_reads: int):
    """Send one NETLINK_ROUTE dump request (unprivileged) and collect ``parse(read) -> (items, done)`` until done."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        seq = int.from_bytes(os.urandom(3), "big")
        sock.send(struct.pack("=IHHII", 16 + len(payload), request_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                  + payload)
        items = []
        for _ in range(max_reads):
            batch, done = parse(sock.recv(1 << 16))
            items += batch
            if done:
                return items
        raise OSError(errno.EMSGSIZE, "rtnetlink dump did not end after %d reads" % max_reads)
    finally:
        sock.close()


def parse_rtnl_routes(data: bytes):
    """Netlink messages of a RTM_GETROUTE dump -> (routes, done). OSError for an NLMSG_ERROR."""
    bodies, done = nl_dump_bodies(data, RTM_NEWROUTE)
    routes = []
    for body in bodies:
        family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = struct.unpack_from("=8BI", body)
        route = {"family": family, "dst_len": dst_len, "table": table, "type": rtype, "dst": None,
                 "oif": None, "gateway": None, "priority": 0, "mtu": None, "multipath": False}
        for attr, value in nl_attrs(body, 12):
            if attr == RTA_DST and family == socket.AF_INET:
                route["dst"] = socket.inet_ntop(socket.AF_INET, value)
            elif attr == RTA_OIF:
                route["oif"] = struct.unpack("=I", value)[0]
            elif attr == RTA_GATEWAY and family == socket.AF_INET:
                route["gateway"] = socket.inet_ntop(socket.AF_INET, value)
            elif attr == RTA_PRIORITY:
                route["priority"] = struct.unpack("=I", value)[0]
            elif attr == RTA_TABLE:
                route["table"] = struct.unpack("=I", value)[0]
            elif attr == RTA_MULTIPATH:
                route["multipath"] = True
            elif attr == RTA_METRICS:
                for metric, mvalue in nl_attrs(value):
                    if metric == RTAX_MTU:
                        route["mtu"] = struct.unpack("=I", mvalue)[0] or None
        routes.append(route)
    return routes, done


def rtnl_routes_v4(timeout: float = 2.0, max_reads: int = 10000):
    """All IPv4 routes from the kernel (RTM_GETROUTE dump over NETLINK_ROUTE; unprivileged)."""
    rtmsg = struct.pack("=8BI", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    return rtnl_dump(RTM_GETROUTE, rtmsg, parse_rtnl_routes, timeout, max_reads)


RTM_NEWADDR, RTM_GETADDR, IFA_ADDRESS, IFA_LOCAL = 20, 22, 1, 2


def parse_rtnl_addrs(data: bytes):
    """Netlink messages of a RTM_GETADDR dump -> (IPv4 addresses, done). OSError for an NLMSG_ERROR.
    Each address: {"index", "prefixlen", "address"}; IFA_LOCAL (the interface's own address) wins over
    IFA_ADDRESS (the peer's on point-to-point links)."""
    bodies, done = nl_dump_bodies(data, RTM_NEWADDR)
    found = []
    for body in bodies:
        family, prefixlen, _flags, _scope, index = struct.unpack_from("=BBBBI", body)
        if family != socket.AF_INET:
            continue
        attrs = dict(nl_attrs(body, 8))
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw:
            found.append({"index": index, "prefixlen": prefixlen,
                          "address": socket.inet_ntop(socket.AF_INET, raw[:4])})
    return found, done


def rtnl_addrs_v4(timeout: float = 2.0, max_reads: int = 10000):
    """All IPv4 addresses from the kernel (RTM_GETADDR dump over NETLINK_ROUTE; unprivileged)."""
    ifaddrmsg = struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)
    return rtnl_dump(RTM_GETADDR, ifaddrmsg, parse_rtnl_addrs, timeout, max_reads)


def covers(route, addr: str) -> bool:
    if route["dst"] is None or route["dst_len"] == 0:
        return route["dst_len"] == 0
    shift = 32 - route["dst_len"]
    net = struct.unpack("!I", socket.inet_aton(route["dst"]))[0] >> shift
    return struct.unpack("!I", socket.inet_aton(addr))[0] >> shift == net


def kernel_route_mtu(addr: str) -> int:
    """The MTU the kernel uses for packets to addr (IP_MTU on a connected UDP socket). Sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((addr, 9))
        return sock.getsockopt(socket.IPPROTO_IP, IP_MTU)


def parse_proc_route_default(text: str):
    """/proc/net/route -> dict(dev, via) of the default route. Its MTU column is advmss+40 (0 when unset),
    never the route MTU, so it is not read."""
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            gw = socket.inet_ntoa(struct.pack("<I", int(cols[2], 16)))
            return {"dev": cols[0], "via": gw if gw != "0.0.0.0" else None}
    return None


def proc_routes_v4(text: str):
    """/proc/net/route -> routes shaped like parse_rtnl_routes' (main table only, no MTU)."""
    routes = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        mask = struct.unpack("<I", struct.pack(">I", int(cols[7], 16)))[0]
        routes.append({"dst": socket.inet_ntoa(struct.pack("<I", int(cols[1], 16))),
                       "dst_len": bin(mask).count("1"), "table": RT_TABLE_MAIN, "type": RTN_UNICAST})
    return routes


def default_route(facts: Facts):
    """The IPv4 default route and the MTU the kernel uses on it, without `ip`.

    mtu: the route's own MTU metric (rtnetlink; None when the route sets none). dev_mtu: its device's MTU.
    kernel_mtu: IP_MTU towards kernel_mtu_to, an address only the default route covers.
    effective_mtu: the MTU the kernel uses for the route: kernel_mtu, else the rtnetlink metric or the
    device MTU when the route sets none; None (with an "errors" entry) when neither could be read."""
    route, routes, rtnl_error = None, None, None
    try:
        routes = [r for r in rtnl_routes_v4() if r["table"] == RT_TABLE_MAIN and r["type"] == RTN_UNICAST]
        defaults = sorted((r for r in routes if r["dst_len"] == 0), key=lambda r: r["priority"])
        if defaults:
            best = defaults[0]
            dev = None
            if best["oif"] is not None:
                try:
                    dev = socket.if_indextoname(best["oif"])
                except OSError:
                    dev = None
            route = {"dev": dev, "via": best["gateway"], "mtu": best["mtu"], "source": "rtnetlink",
                     "multipath": best["multipath"]}
    except (OSError, ValueError, struct.error) as exc:
        rtnl_error = "rtnetlink route dump failed: %s" % exc
        facts.error("default_route.mtu", rtnl_error)
        routes = None
    if route is None and rtnl_error:
        text, err = read_text_or_error("/proc/net/route")
        if text is None:
            facts.error("default_route", err)
            return None
        found = parse_proc_route_default(text)
        if found is None:
            return None
        route = dict(found, mtu=None, source="/proc/net/route", multipath=False)
        routes = proc_routes_v4(text)
    if route is None:
        return None
    dev_mtu = read_text("/sys/class/net/%s/mtu" % route["dev"]) if route["dev"] else None
    route["dev_mtu"] = int(dev_mtu) if dev_mtu and dev_mtu.strip().isdigit() else None
    route["kernel_mtu"] = route["kernel_mtu_to"] = None
    specific = [r for r in routes if r["dst_len"] > 0]
    probe = next((a for a in ROUTE_PROBE_ADDRS if not any(covers(r, a) for r in specific)), None)
    if probe is None:
        facts.error("default_route.kernel_mtu", "every address in %s has a more specific route"
                    % ", ".join(ROUTE_PROBE_ADDRS))
    else:
        try:
            route["kernel_mtu"], route["kernel_mtu_to"] = kernel_route_mtu(probe), probe
        except OSError as exc:
            facts.error("default_route.kernel_mtu", "IP_MTU towards %s: %s" % (probe, exc))
    if route["kernel_mtu"] is not None:
        route["effective_mtu"] = route["kernel_mtu"]
    elif route["source"] == "rtnetlink":
        route["effective_mtu"] = route["mtu"] or route["dev_mtu"]
    else:
        route["effective_mtu"] = None
        facts.error("default_route.effective_mtu", "neither rtnetlink nor IP_MTU answered: the route MTU "
                    "is unknown (/proc/net/route does not hold it)")
    return route


def parse_conntrack_stat(text: str):
    """/proc/net/stat/nf_conntrack: a header, one hex row per CPU -> summed counters.
    'entries' is the table size repeated on every row, so it is taken once, not summed."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError("no per-CPU rows")
    header, rows = lines[0], lines[1:]
    sums = {name: 0 for name in header}
    for row in rows:
        for name, value in zip(header, row):
            sums[name] += int(value, 16)
    if "entries" in sums:
        sums["entries"] = int(rows[0][header.index("entries")], 16)
    return sums


def parse_snmp(text: str, prefix: str = "Ip"):
    """/proc/net/snmp: pairs of 'Ip: names' / 'Ip: values' lines -> {name: int}."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(prefix + ":")]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]):
        raise ValueError("no %r names/values pair" % prefix)
    return dict(zip(rows[0][1:], (int(v) for v in rows[1][1:])))


def parse_snmp6_fragments(text: str):
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) == 2 and cols[0].startswith(("Ip6Frag", "Ip6Reasm")):
            out[cols[0]] = int(cols[1])
    if not out:
        raise ValueError("no Ip6Frag*/Ip6Reasm* counters")
    return out


def ip_fragment_counters(facts: Facts):
    """IPv4 (and, when the kernel has IPv6, IPv6) fragment counters; None with an error when unreadable."""
    ip = facts.parsed("ip_fragments", "/proc/net/snmp", parse_snmp)
    if ip is None:
        return None
    out = {k: v for k, v in ip.items() if k.startswith(("Frag", "Reasm"))}
    if not out:
        facts.error("ip_fragments", "/proc/net/snmp has no Frag*/Reasm* counters")
        return None
    if os.path.exists("/proc/net/snmp6"):
        v6 = facts.parsed("ip_fragments.ipv6", "/proc/net/snmp6", parse_snmp6_fragments)
        out.update(v6 or {})
    return out


#: TcpExt counters (/proc/net/netstat, per network namespace) that count connections or segments the TCP stack
#: itself dropped: a full accept queue (ListenOverflows; ListenDrops counts every drop at a listener), a full
#: SYN queue, the socket backlog, the receive queue or memory. A load that loses connections while the datapath's
#: tables show nothing can be placed here, in the server's or the client's own stack.
TCP_DROP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPBacklogDrop", "TCPRcvQDrop",
                     "TCPAbortOnMemory")
#: Read with them, never judged as drops: SYNs and segments sent again (what a slow open took).
TCP_RETRANS_COUNTERS = ("TCPSynRetrans", "TCPTimeouts")


def tcp_ext_counters(facts: Facts):
    """The TCP stack's drop and retransmit counters of this network namespace; None with an error when
    /proc/net/netstat is unreadable or lacks one of them."""
    ext = facts.parsed("tcp_ext", "/proc/net/netstat", lambda text: parse_snmp(text, "TcpExt"))
    if ext is None:
        return None
    absent = [name for name in TCP_DROP_COUNTERS + TCP_RETRANS_COUNTERS if name not in ext]
    if absent:
        facts.error("tcp_ext", "/proc/net/netstat has no TcpExt counter %s" % ", ".join(absent))
        return None
    return {name: ext[name] for name in TCP_DROP_COUNTERS + TCP_RETRANS_COUNTERS}


def kube_proxy_running() -> bool:
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        comm = (read_text("/proc/%s/comm" % pid) or "").strip()
        cmdline = (read_text("/proc/%s/cmdline" % pid) or "").split("\0")[0]
        if comm == "kube-proxy" or os.path.basename(cmdline) == "kube-proxy":
            return True
    return False


def kube_services_rules(facts: Facts):
    """KUBE-SERVICES in iptables-save, or kube-proxy's tables in `nft list ruleset`.
    present: True/False from the tools that ran; None when none could tell (absent tools, as in a pod,
    or failing ones: each failure is an "errors" entry)."""
    sources = {}
    for tool, cmd in (("iptables-save", ["iptables-save"]), ("nft", ["nft", "list", "ruleset"])):
        if not shutil.which(cmd[0]):
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as exc:
            sources[tool] = None
            facts.error("kube_services_rules." + tool, "%s: %s" % (" ".join(cmd), exc))
            continue
        text = res.stdout
        if res.returncode:
            sources[tool] = None
            facts.error("kube_services_rules." + tool, "%s exited %d: %s"
                        % (" ".join(cmd), res.returncode, res.stderr.strip()[:200]))
            continue
        sources[tool] = "KUBE-SERVICES" in text or "table ip kube-proxy" in text or "table ip6 kube-proxy" in text
    known = [v for v in sources.values() if v is not None]
    return {"present": any(known) if known else None, "sources": sources}


def cmd_facts(_args) -> dict:
    facts = Facts()
    stat = None
    if os.path.exists("/proc/net/stat/nf_conntrack"):
        stat = facts.parsed("conntrack.stat", "/proc/net/stat/nf_conntrack", parse_conntrack_stat)
    else:
        facts.error("conntrack.stat", "/proc/net/stat/nf_conntrack is absent (nf_conntrack not loaded?)")
    doc = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "sysctls": {name: read_sysctl(name) for name in TUNING_SYSCTLS},
        "interfaces": interfaces(facts),
        "default_route": default_route(facts),
        "conntrack": {"count": facts.counter("net.netfilter.nf_conntrack_count"),
                      "max": facts.counter("net.netfilter.nf_conntrack_max"),
                      "stat": stat},
        "ip_fragments": ip_fragment_counters(facts),
        "tcp_ext": tcp_ext_counters(facts),
        "kube_proxy_running": kube_proxy_running(),
        "kube_services_rules": kube_services_rules(facts),
    }
    doc["errors"] = facts.errors
    return doc


# ---------------------------------------------------------------- arp

ETH_P_ARP, ETH_P_IP, ARPHRD_ETHER = 0x0806, 0x0800, 1
ARPOP_REQUEST, ARPOP_REPLY = 1, 2
PACKET_OUTGOING = 4
SIOCGIFADDR = 0x8915
BROADCAST_MAC = b"\xff" * 6
ONE_ANNOUNCER, SEVERAL_ANNOUNCERS, NO_ANNOUNCER = "one_announcer", "several_announcers", "no_announcer"
ARP_MAX_FRAMES = 100000  # a flood cannot keep the loop going past this many frames


def mac_text(raw: bytes) -> str:
    return ":".join("%02x" % b for b in raw)


def arp_request(src_mac: bytes, src_ip: str, ip: str) -> bytes:
    """An Ethernet broadcast ARP who-has ip tell src_ip (src_ip 0.0.0.0 makes it an RFC 5227 probe)."""
    eth = BROADCAST_MAC + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, src_mac,
                      socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(ip))
    return (eth + arp).ljust(60, b"\0")


def parse_arp_frame(frame: bytes):
    """An Ethernet frame -> dict(op, eth_src, eth_dst, sha, spa, tha, tpa), or None when it is not IPv4-over-
    Ethernet ARP."""
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        return None
    return {"op": op, "eth_dst": mac_text(frame[0:6]), "eth_src": mac_text(frame[6:12]), "sha": mac_text(sha),
            "spa": socket.inet_ntoa(spa), "tha": mac_text(tha), "tpa": socket.inet_ntoa(tpa)}


def arp_claim(frame: dict, ip: str, own_mac: str):
    """'reply' when frame answers who-has ip, 'gratuitous' when it announces ip unasked (MetalLB sends both a
    request and a reply with sender = target = ip on failover), None otherwise. Our own frames are never claims."""
    if frame is None or frame["spa"] != ip or frame["sha"] == own_mac:
        return None
    if frame["op"] == ARPOP_REPLY:
        return "gratuitous" if frame["tpa"] == ip else "reply"
    if frame["op"] == ARPOP_REQUEST and frame["tpa"] == ip:
        return "gratuitous"
    return None


def arp_verdict(macs) -> str:
    return {0: NO_ANNOUNCER, 1: ONE_ANNOUNCER}.get(len(macs), SEVERAL_ANNOUNCERS)


def iface_ipv4(sock: socket.socket, iface: str):
    """The interface's first IPv4 address (SIOCGIFADDR), or None when it has none."""
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", iface.encode()[:15]))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    return socket.inet_ntoa(res[20:24])


def open_arp_socket(iface: str) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except PermissionError:
        raise CannotRun("a raw AF_PACKET socket needs CAP_NET_RAW: run as root, or add the NET_RAW capability "
                        "(securityContext.capabilities.add: [NET_RAW] in a pod)")
    try:
        sock.bind((iface, ETH_P_ARP))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENODEV:
            raise CannotRun("no interface %r here (see /sys/class/net)" % iface)
        raise CannotRun("cannot bind a raw socket to %s: %s" % (iface, exc.strerror or exc))
    return sock


class ArpRun:
    """Send `count` requests `interval` apart, and collect every claim on ip until `window` ends."""

    def __init__(self, args):
        self.args = args
        self.responders = {}  # sha -> entry
        self.frames_seen = 0

    def record(self, claim: str, frame: dict, elapsed: float):
        entry = self.responders.setdefault(frame["sha"], {"mac": frame["sha"], "eth_src": [], "replies": 0,
                                                           "gratuitous": 0, "first_seen_ms": None})
        entry["replies" if claim == "reply" else "gratuitous"] += 1
        if frame["eth_src"] not in entry["eth_src"]:
            entry["eth_src"].append(frame["eth_src"])
        if entry["first_seen_ms"] is None:
            entry["first_seen_ms"] = round(elapsed * 1000, 3)

    def run(self) -> dict:
        a = self.args
        sock = open_arp_socket(a.iface)
        try:
            own_mac = mac_text(sock.getsockname()[4][:6])
            src_ip = iface_ipv4(sock, a.iface) or "0.0.0.0"
            request = arp_request(bytes.fromhex(own_mac.replace(":", "")), src_ip, a.ip)
            sent = self.exchange(sock, request, own_mac)
        finally:
            sock.close()
        responders = sorted(self.responders.values(), key=lambda r: r["mac"])
        return {"iface": a.iface, "ip": a.ip, "source_mac": own_mac, "source_ip": src_ip, "requests_sent": sent,
                "window_s": a.window, "frames_seen": self.frames_seen, "responders": responders,
                "macs": [r["mac"] for r in responders], "verdict": arp_verdict(responders), "errors": []}

    def exchange(self, sock, request: bytes, own_mac: str):
        a = self.args
        start = time.monotonic()
        deadline, next_send, sent = start + a.window, start, 0
        while self.frames_seen < ARP_MAX_FRAMES:
            now = time.monotonic()
            if sent < a.count and now >= next_send:
                sock.send(request)
                sent += 1
                next_send = start + sent * a.interval
            if now >= deadline:
                break
            wake = min(deadline, next_send) if sent < a.count else deadline
            ready, _, _ = select.select([sock], [], [], max(0.0, wake - now))
            if not ready:
                continue
            frame, addr = sock.recvfrom(2048)
            self.frames_seen += 1
            if addr[2] == PACKET_OUTGOING:
                continue
            parsed = parse_arp_frame(frame)
            claim = arp_claim(parsed, a.ip, own_mac)
            if claim:
                self.record(claim, parsed, time.monotonic() - start)
        return sent


def cmd_arp(args) -> dict:
    return ArpRun(args).run()


def ipv4_address(text: str) -> str:
    """A dotted-quad IPv4 address (inet_aton alone would accept '10.1' and '10')."""
    try:
        if text.count(".") != 3:
            raise OSError
        return socket.inet_ntoa(socket.inet_aton(text))
    except OSError:
        raise argparse.ArgumentTypeError("expected an IPv4 address such as 10.0.0.200, got %r" % text)


# ---------------------------------------------------------------- main

class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        emit({"error": message})
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="netprobe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{serve,connect,mtu,load,facts,arp}")

    s = sub.add_parser("serve", help="TCP greeter/sink and UDP echo; runs until killed")
    s.add_argument("--tcp", type=port_list, default=[], help="comma-separated TCP ports")
    s.add_argument("--udp", type=port_list, default=[], help="comma-separated UDP ports")
    s.add_argument("--http", type=port_list, default=[], help="comma-separated TCP ports answering HTTP GET")
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
    c.add_argument("--dns-name", default="kubernetes.default.svc.cluster.local", help="name asked by /dns targets")
    c.add_argument("--dns-type", choices=sorted(DNS_TYPES), default="A", help="record type asked by /dns targets")

    m = sub.add_parser("mtu", help="path MTU by DF UDP binary search, then a TCP bulk transfer")
    m.add_argument("--to", type=host_port, required=True, help="HOST:PORT where serve has TCP and UDP")
    m.add_argument("--max", type=int, default=0, help="largest packet size (bytes) to try; default: route MTU")
    m.add_argument("--bulk-mib", type=non_negative, default=2.0, help="TCP transfer size (0 = skip)")
    m.add_argument("--bulk-timeout", type=positive(float), default=None,
                   help="seconds for the TCP transfer (default: from the measured RTT, %g..%g s)"
                   % (BULK_TIMEOUT_FLOOR, BULK_TIMEOUT_CAP))
    m.add_argument("--timeout", type=positive(float), default=0.5, help="seconds to wait for each echo")
    m.add_argument("--retries", type=int, choices=range(0, 10), default=2, metavar="0..9",
                   help="sends again a size that got no echo before counting it as lost")

    ld = sub.add_parser("load", help="open, hold and close many TCP connections")
    ld.add_argument("--to", type=host_ports, required=True, help="HOST:PORT[,PORT...]")
    ld.add_argument("--connections", type=positive(int), required=True)
    ld.add_argument("--rate", type=non_negative, default=0.0, help="opens per second (0 = as fast as possible)")
    ld.add_argument("--hold", type=non_negative, default=1.0, help="seconds to hold")
    ld.add_argument("--timeout", type=positive(float), default=3.0, help="connect timeout, seconds")
    ld.add_argument("--source", type=lambda t: [a.strip() for a in t.split(",") if a.strip()], default=None,
                    help="comma-separated local source addresses, used round-robin")
    ld.add_argument("--workers", type=positive(int), default=0, help="processes (default: from N and the fd limit)")
    ld.add_argument("--open-slack", type=non_negative, default=30.0,
                    help="seconds the opening may run past N/rate + --timeout; what is left then counts as "
                         "`not_opened` / `unfinished` (the client fell behind), never as a timeout")
    ld.add_argument("--verify-timeout", type=positive(float), default=5.0,
                    help="seconds to wait, after the hold, for the byte sent on each held connection to come back "
                         "(`verified`: answered by `serve --tcp`)")

    sub.add_parser("facts", help="sysctls, MTUs, conntrack and fragment counters, kube-proxy presence")

    ar = sub.add_parser("arp", help="every ARP reply for an IPv4 address on one link, by responder MAC")
    ar.add_argument("--iface", required=True, help="the link to ask on (e.g. the lab bridge)")
    ar.add_argument("--ip", type=ipv4_address, required=True, help="the address asked for (e.g. a LoadBalancer VIP)")
    ar.add_argument("--count", type=positive(int), default=3, help="requests to send (default 3)")
    ar.add_argument("--interval", type=positive(float), default=0.2, help="seconds between requests (default 0.2)")
    ar.add_argument("--window", type=positive(float), default=2.0,
                    help="seconds from the first request during which replies are collected (default 2)")
    return parser


def check_args(parser, args):
    if args.cmd == "connect":
        args.targets = args.targets + (args.target_file or [])
        if not args.targets:
            parser.error("connect: give at least one --to HOST:PORT/PROTO or --targets FILE")
    if args.cmd == "serve" and set(args.tcp) & set(args.http):
        parser.error("serve: a port is either --tcp or --http, not both: %s"
                     % ",".join(map(str, sorted(set(args.tcp) & set(args.http)))))
    if args.cmd == "mtu" and args.max and not 68 <= args.max <= 65535:
        parser.error("mtu: --max is the largest packet size in bytes (68..65535), got %d" % args.max)
    if args.cmd == "load" and args.connections > 1_000_000:
        parser.error("load: --connections is capped at 1000000")
    if args.cmd == "arp" and (args.count - 1) * args.interval >= args.window:
        parser.error("arp: the window (%gs) must outlast the requests (%d x %gs apart)"
                     % (args.window, args.count, args.interval))
    if args.cmd == "arp" and args.count > 1000:
        parser.error("arp: --count is capped at 1000")


COMMANDS = {"serve": cmd_serve, "connect": cmd_connect, "mtu": cmd_mtu, "load": cmd_load, "facts": cmd_facts,
            "arp": cmd_arp}


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
