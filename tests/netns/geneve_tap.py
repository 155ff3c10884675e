"""Geneve (RFC 8926) tunnel endpoint in user space, over a TAP device.

Stand-in for the kernel's geneve driver on kernels built without CONFIG_GENEVE
(this CI kernel has VXLAN but no Geneve). The bytes on the wire are real Geneve:
outer IPv4 (20) + UDP (8) to port 6081 + Geneve header (8, no options, protocol
0x6558 Transparent Ethernet Bridging) + the inner Ethernet frame (14 + payload):
50 bytes of overhead, like the kernel driver.

--df set   : outer packets carry DF (IP_PMTUDISC_DO); an outer packet larger than
             the underlay MTU cannot be sent and is dropped, like `geneve ... df set`.
--df unset : the outer packet is fragmented by the kernel (IP_PMTUDISC_DONT).

Run inside the node's namespace; it creates the TAP device, writes --ready-file
and forwards until SIGTERM. The test configures the device's address and MTU.
"""
import argparse
import fcntl
import os
import selectors
import signal
import socket
import struct

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
GENEVE_PORT, TEB = 6081, 0x6558


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def geneve_header(vni: int) -> bytes:
    return struct.pack("!BBHI", 0, 0, TEB, vni << 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev", default="ov0")
    ap.add_argument("--local", required=True)
    ap.add_argument("--remote", required=True)
    ap.add_argument("--vni", type=int, default=42)
    ap.add_argument("--df", choices=("set", "unset"), default="set")
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()

    tap = open_tap(args.dev)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.local, GENEVE_PORT))
    udp.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if args.df == "set" else IP_PMTUDISC_DONT)
    udp.setblocking(False)
    header, remote = geneve_header(args.vni), (args.remote, GENEVE_PORT)
    stats = {"encap": 0, "decap": 0, "too_big": 0}

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sel = selectors.DefaultSelector()
    sel.register(tap, selectors.EVENT_READ, "tap")
    sel.register(udp, selectors.EVENT_READ, "udp")
    with open(args.ready_file, "w") as out:
        out.write(str(os.getpid()))
    while not stop:
        for key, _ in sel.select(0.5):
            try:
                if key.data == "tap":
                    frame = os.read(tap, 65535)
                    udp.sendto(header + frame, remote)
                    stats["encap"] += 1
                else:
                    data = udp.recv(65535)
                    if len(data) > 8 and data[2:4] == header[2:4] and data[4:7] == header[4:7]:
                        os.write(tap, data[8:])
                        stats["decap"] += 1
            except BlockingIOError:
                pass
            except OSError as exc:  # EMSGSIZE with df set: dropped, no ICMP to the inner sender
                stats["too_big"] += 1 if exc.errno == 90 else 0


if __name__ == "__main__":
    main()
