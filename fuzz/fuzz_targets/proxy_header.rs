//! The PROXY v2 reader on arbitrary bytes: it never panics nor reads past the
//! datagram, and whatever it reads as a client writes back to a header that
//! reads the same, with the same datagram after it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate::net::proxy_v2::{self, Parsed};

fuzz_target!(|data: &[u8]| {
    match proxy_v2::parse(data) {
        Ok(Parsed::Proxied {
            source,
            destination,
            payload,
        }) => {
            assert!(payload.len() + 16 <= data.len());
            let mut again = Vec::new();
            proxy_v2::write(source, destination, &mut again);
            again.extend_from_slice(payload);
            assert_eq!(
                proxy_v2::parse(&again),
                Ok(Parsed::Proxied {
                    source,
                    destination,
                    payload
                })
            );
        }
        Ok(Parsed::Local { payload }) => assert!(payload.len() + 16 <= data.len()),
        Err(error) => assert!(!error.as_str().is_empty()),
    }
});
