;; A plain scriptable UDP proxy: every datagram goes to the pool `backend`, and
;; whatever an endpoint sends back reaches the client unchanged (this guest has
;; no `on_reply`, so upstream datagrams never enter it).
;;   wasmgate --upstream backend=127.0.0.1:9000 --module examples/forward.wat
(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  ;; 2 pages = 128 KiB: the pool's name, then room for the largest datagram.
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")

  ;; Every datagram is put at address 64.
  (func (export "alloc") (param $len i32) (result i32)
    i32.const 64)

  ;; Forward it and reply nothing ourselves: -1. (forward's negative result, if
  ;; any, is counted by the gateway; a datagram that went nowhere is a drop.)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1))
