//! wasmgate's default guest (ABI v1): replies with the datagram, ASCII `a`–`z`
//! uppercased and every other byte unchanged, exactly like Python's `bytes.upper()`.
//!
//! The datagram is copied into one static buffer and uppercased in place, so the
//! guest needs no allocator and its state between datagrams is that buffer alone.

#![no_std]

/// The largest UDP payload over IPv4 (65,535 − 8 − 20); the host never sends more.
const MAX_DATAGRAM: usize = 65_507;

static mut BUFFER: [u8; MAX_DATAGRAM] = [0; MAX_DATAGRAM];

/// Returns where the host should copy a datagram of `len` bytes, or 0 if it is too large.
#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: i32) -> i32 {
    if len < 0 || len as usize > MAX_DATAGRAM {
        return 0;
    }
    (&raw mut BUFFER) as i32
}

/// Uppercases the `len` bytes at `ptr` in place and replies with them.
#[unsafe(no_mangle)]
pub extern "C" fn handle(ptr: i32, len: i32) -> i64 {
    let len = (len as usize).min(MAX_DATAGRAM);
    // SAFETY: the host copied `len` bytes to the buffer `alloc` returned, and
    // nothing else touches it while `handle` runs (one call at a time per instance).
    let buf = unsafe { core::slice::from_raw_parts_mut((&raw mut BUFFER).cast::<u8>(), len) };
    upper(buf);
    ((ptr as u32 as i64) << 32) | len as i64
}

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

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
