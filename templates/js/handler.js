// {{name}}: a wasmgate handler in JavaScript (the `handler` world of wit/handler.wit).
//
// `handle` gets each datagram (a Uint8Array) and the client's address
// (`ip:port`) and returns the reply, or undefined for no reply. A thrown
// exception costs only the datagram being handled.
import log from "log";

const decoder = new TextDecoder();
const encoder = new TextEncoder();

export function handle(datagram, peer) {
  log(3, `${datagram.length} bytes from ${peer}`); // 3: debug
  return encoder.encode(decoder.decode(datagram).toUpperCase());
}
