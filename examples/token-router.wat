;; A router by token (Quilkin's TokenRouter): the first 8 bytes of each datagram
;; are a session token; the rest goes to the endpoint of the pool `backend` that
;; the token hashes to, whichever address the client sends from. Datagrams
;; shorter than the token are dropped.
;;   wasmgate --upstream backend=10.0.0.7:7777,10.0.0.8:7777 --module examples/token-router.wat
(module
  (import "wasmgate" "forward_key"
    (func $forward_key (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")

  (func (export "alloc") (param $len i32) (result i32)
    i32.const 64)

  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.lt_u (local.get $len) (i32.const 8))
      (then (return (i64.const -1))))
    ;; pool "backend", key = bytes 0..8, data = bytes 8..len
    (drop (call $forward_key
      (i32.const 0) (i32.const 7)
      (local.get $ptr) (i32.const 8)
      (i32.add (local.get $ptr) (i32.const 8)) (i32.sub (local.get $len) (i32.const 8))))
    i64.const -1))
