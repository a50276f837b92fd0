;; A guest for shared pools, keyed on each datagram's first byte (its "ID"):
;; `handle` keeps the client's handle under the ID and forwards the datagram
;; to `backend`; `on_reply` takes the handle kept under the answer's ID (once:
;; a duplicate finds none), names the client with `reply_to` and passes the
;; answer on. An answer whose ID it has no handle for, or whose `reply_to` is
;; refused, reaches no one. A datagram starting with "?" is answered with the
;; code `client` gave, as 8 bytes little-endian, and nothing is forwarded.
(module
  (import "wasmgate" "client" (func $client (result i64)))
  (import "wasmgate" "reply_to" (func $reply_to (param i64) (result i32)))
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func $slot (param $ptr i32) (result i32)
    (i32.add (i32.const 8192) (i32.shl (i32.load8_u (local.get $ptr)) (i32.const 3))))
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $h i64)
    (if (i32.eqz (local.get $len)) (then (return (i64.const -1))))
    (local.set $h (call $client))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 63))
      (then
        (i64.store (i32.const 16) (local.get $h))
        (return (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 8)))))
    (if (i64.lt_s (local.get $h) (i64.const 0)) (then (return (i64.const -1))))
    (i64.store (call $slot (local.get $ptr)) (local.get $h))
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1)
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (local $h i64)
    (if (i32.eqz (local.get $len)) (then (return (i64.const -1))))
    (local.set $h (i64.load (call $slot (local.get $ptr))))
    (if (i64.eqz (local.get $h)) (then (return (i64.const -1))))
    (i64.store (call $slot (local.get $ptr)) (i64.const 0))
    (if (i32.ne (call $reply_to (local.get $h)) (i32.const 0)) (then (return (i64.const -1))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
