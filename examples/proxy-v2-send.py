#!/usr/bin/env python3
"""A stand-in for a proxy that speaks PROXY protocol v2 over UDP (HAProxy's
proxy-protocol.txt, section 2.2): sends MESSAGE to GATEWAY from --from, behind
a v2 header naming CLIENT as the one who sent it, and prints the answer's
header and payload. Exits 1 if no answer comes within a second.

  python3 examples/proxy-v2-send.py [--from IP] [--no-header] GATEWAY CLIENT MESSAGE
"""

import argparse
import ipaddress
import socket
import struct
import sys

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def split(addr):
    host, _, port = addr.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def header(source, destination):
    (sip, sport), (dip, dport) = source, destination
    if sip.version == 4 and dip.version == 4:
        body = sip.packed + dip.packed + struct.pack("!HH", sport, dport)
        family = 0x12  # AF_INET, SOCK_DGRAM
    else:
        v6 = lambda ip: ip.packed if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}").packed
        body = v6(sip) + v6(dip) + struct.pack("!HH", sport, dport)
        family = 0x22  # AF_INET6, SOCK_DGRAM
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def parse(datagram):
    """(source, destination, payload) of a v2 datagram, or None without a header."""
    if not datagram.startswith(SIGNATURE) or len(datagram) < 16:
        return None
    family = datagram[13]
    (length,) = struct.unpack("!H", datagram[14:16])
    body, payload = datagram[16 : 16 + length], datagram[16 + length :]
    if family >> 4 == 1:
        ips = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        ports = struct.unpack("!HH", body[8:12])
    else:
        ips = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = struct.unpack("!HH", body[32:36])
    show = lambda ip, port: f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return show(ips[0], ports[0]), show(ips[1], ports[1]), payload


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", default="127.0.0.2", help="the proxy's address (default 127.0.0.2)")
    parser.add_argument("--no-header", action="store_true", help="send the message without a header")
    parser.add_argument("gateway")
    parser.add_argument("client")
    parser.add_argument("message")
    args = parser.parse_args()
    gateway = split(args.gateway)
    sock = socket.socket(socket.AF_INET6 if gateway[0].version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.source, 0))
    sock.settimeout(1.0)
    datagram = args.message.encode()
    if not args.no_header:
        datagram = header(split(args.client), gateway) + datagram
    sock.sendto(datagram, (str(gateway[0]), gateway[1]))
    try:
        answer, _ = sock.recvfrom(65535)
    except socket.timeout:
        print("no answer")
        return 1
    parsed = parse(answer)
    if parsed is None:
        print(f"no header: {answer.decode(errors='replace')}")
    else:
        source, destination, payload = parsed
        print(f"PROXY {source} -> {destination}: {payload.decode(errors='replace')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
