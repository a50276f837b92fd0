"""A wasmgate handler in Python: canonical JSON.

Each datagram should be one JSON value; the reply is the same value in
canonical form (keys sorted, no insignificant whitespace, UTF-8), so that
equal documents give equal bytes whatever their sender wrote. Anything that
is not JSON gets `invalid JSON` back, and the reason goes to the log.

Build (from this directory):
    pip install -r requirements.txt
    componentize-py -d ../../wit -w handler componentize app -o python.wasm
"""

import json

import wit_world

DEBUG = 3  # log levels: 0 error, 1 warn, 2 info, 3 debug, 4 trace


class WitWorld(wit_world.WitWorld):
    def handle(self, datagram: bytes, peer: str) -> bytes | None:
        if not datagram:
            return None  # an empty datagram gets no answer
        try:
            value = json.loads(datagram)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            wit_world.log(DEBUG, f"invalid JSON from {peer}: {e}")
            return b"invalid JSON"
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
