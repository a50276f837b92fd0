"""A wasmgate handler in Python: canonical JSON.

Each datagram should be one JSON value; the reply is the same value in
canonical form (keys sorted, no insignificant whitespace, UTF-8), so that
equal documents give equal bytes whatever their sender wrote. Anything that
is not JSON gets `invalid JSON` back, and the reason goes to the log.

It counts the documents it sees by result (docs/ABI.md, "Metrics"):
`/metrics` shows `wasmgate_guest_json_documents_total{result="canonical"|"invalid"}`.

Build (from this directory):
    pip install -r requirements.txt
    componentize-py -d ../../wit -w metered-handler componentize app -o python.wasm
"""

import json

import wit_world
from wit_world.imports import metrics
from componentize_py_types import Err

DEBUG = 3  # log levels: 0 error, 1 warn, 2 info, 3 debug, 4 trace

# The counter's id, defined with the host on first use (not at build time:
# componentize-py runs the module's top level while building).
_documents = None


def count(result: str) -> None:
    """Adds 1 to `json_documents{result}`; a refused call changes no answer."""
    global _documents
    try:
        if _documents is None:
            _documents = metrics.define(metrics.MetricKind.COUNTER, "json_documents", ["result"], [])
        metrics.add(_documents, [result], 1.0)
    except Err:
        pass


class WitWorld(wit_world.WitWorld):
    def handle(self, datagram: bytes, peer: str) -> bytes | None:
        if not datagram:
            return None  # an empty datagram gets no answer
        try:
            value = json.loads(datagram)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            wit_world.log(DEBUG, f"invalid JSON from {peer}: {e}")
            count("invalid")
            return b"invalid JSON"
        count("canonical")
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
