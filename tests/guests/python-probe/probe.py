"""A hostile and probing Python handler for tests/components.rs.

The datagram names what to do; each case either misbehaves (and must cost
exactly that datagram) or reports what the sandbox let it see.
Build: see scripts/build-guests.sh (componentize-py -d ../../../wit -w handler componentize probe -o probe.wasm).
"""

import json
import os
import sys
import time

import wit_world


def _attempt(action) -> str:
    try:
        return f"allowed: {action()!r}"[:200]
    except BaseException as e:  # what the sandbox answered
        return f"denied: {type(e).__name__}"


def _connect():
    import socket

    return socket.create_connection(("127.0.0.1", 9), timeout=0.01)


class WitWorld(wit_world.WitWorld):
    def handle(self, datagram: bytes, peer: str) -> bytes | None:
        cmd = datagram.decode(errors="replace").strip()
        if cmd == "loop":
            while True:
                pass
        if cmd == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(64 << 20))
        if cmd == "raise":
            raise ValueError("raised on purpose")
        if cmd == "sleep":
            time.sleep(5)
            return b"slept"
        if cmd == "print":
            print("hello from python on stdout")
            print("and on stderr", file=sys.stderr)
            return b"printed"
        if cmd == "env":
            return json.dumps(dict(os.environ)).encode()
        if cmd == "file":
            return _attempt(lambda: open("/etc/passwd").read(10)).encode()
        if cmd == "dir":
            return _attempt(lambda: os.listdir("/")).encode()
        if cmd == "socket":
            return _attempt(_connect).encode()
        if cmd == "random":
            return str(len(os.urandom(16))).encode()
        if cmd == "forward":
            try:
                wit_world.forward("nowhere", datagram)
                return b"forwarded"
            except Exception as e:  # componentize_py_types.Err(CallError)
                return f"refused: {e.value.name}".encode()
        return b"ok " + peer.encode()
