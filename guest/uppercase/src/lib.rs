//! wasmgate's default guest: replies with the datagram, ASCII `a`–`z` uppercased
//! and every other byte unchanged, exactly like Python's `bytes.upper()`.
//!
//! Written with the wasmgate SDK: the datagram arrives in the SDK's static buffer
//! and is uppercased in place, so the guest needs no allocator.

#![no_std]

use wasmgate_sdk::{Context, Reply};

fn uppercase<'a>(datagram: &'a mut [u8], _ctx: &'a mut Context) -> Reply<'a> {
    upper(datagram);
    Reply::Send(datagram)
}

wasmgate_sdk::handler!(uppercase);

fn upper(buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(16);
    #[cfg(target_feature = "simd128")]
    for chunk in &mut chunks {
        use core::arch::wasm32::*;
        // SAFETY: `chunk` is exactly 16 bytes; v128 loads and stores need no alignment.
        unsafe {
            let v = v128_load(chunk.as_ptr().cast());
            let lower = v128_and(u8x16_ge(v, u8x16_splat(b'a')), u8x16_le(v, u8x16_splat(b'z')));
            let up = v128_xor(v, v128_and(lower, u8x16_splat(0x20)));
            v128_store(chunk.as_mut_ptr().cast(), up);
        }
    }
    for b in chunks.into_remainder() {
        b.make_ascii_uppercase();
    }
}
