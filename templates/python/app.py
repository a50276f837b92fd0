"""{{name}}: a wasmgate handler in Python (the `handler` world of wit/handler.wit).

`handle` gets each datagram and the client's address (`ip:port`) and returns
the reply, or None for no reply. Raising, looping or allocating without end
costs only the datagram being handled.
"""

import wit_world


class WitWorld(wit_world.WitWorld):
    def handle(self, datagram: bytes, peer: str) -> bytes | None:
        wit_world.log(3, f"{len(datagram)} bytes from {peer}")  # 3: debug
        return datagram.upper()
