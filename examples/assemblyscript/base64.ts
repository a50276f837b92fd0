// A wasmgate handler in AssemblyScript (guest ABI v1): replies with the datagram
// encoded as base64 (RFC 4648, standard alphabet, with padding). Datagrams over
// 49,128 bytes would encode to more than 65,507 bytes; the gateway drops those
// replies as `oversize`.
//
// Build (npm registry):  cd examples/assemblyscript && npm ci && npm run build

const MAX_DATAGRAM: i32 = 65507;
const MAX_ENCODED: i32 = ((MAX_DATAGRAM + 2) / 3) * 4;

// Static buffers: no allocator, so the stub runtime is enough.
const input = memory.data(MAX_DATAGRAM);
const output = memory.data(MAX_ENCODED);

// The base64 symbol for a 6-bit value.
@inline function symbol(v: u32): u8 {
  return <u8>(v < 26 ? 65 + v : v < 52 ? 71 + v : v < 62 ? v - 4 : v == 62 ? 43 : 47);
}

@inline function put4(at: usize, n: u32): void {
  store<u8>(at, symbol(n >> 18));
  store<u8>(at + 1, symbol((n >> 12) & 63));
  store<u8>(at + 2, symbol((n >> 6) & 63));
  store<u8>(at + 3, symbol(n & 63));
}

// ABI v1: where the host copies a datagram of `len` bytes.
export function alloc(len: i32): usize {
  return len >= 0 && len <= MAX_DATAGRAM ? input : 0;
}

// ABI v1: the reply is (pointer << 32) | length.
// A failed assert calls the host's `env.abort`, which logs the message and traps.
export function handle(ptr: usize, len: i32): i64 {
  assert(ptr == input && len >= 0 && len <= MAX_DATAGRAM, "datagram outside the input buffer");
  let o = output;
  let i = 0;
  for (; i + 3 <= len; i += 3) {
    const at = ptr + <usize>i;
    put4(o, (<u32>load<u8>(at) << 16) | (<u32>load<u8>(at + 1) << 8) | <u32>load<u8>(at + 2));
    o += 4;
  }
  const rest = len - i;
  if (rest > 0) {
    const at = ptr + <usize>i;
    const second: u32 = rest == 2 ? <u32>load<u8>(at + 1) << 8 : 0;
    put4(o, (<u32>load<u8>(at) << 16) | second);
    store<u8>(o + 3, 61); // '='
    if (rest == 1) store<u8>(o + 2, 61);
    o += 4;
  }
  return (<i64>output << 32) | <i64>(o - output);
}
