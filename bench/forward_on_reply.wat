;; examples/forward.wat with an `on_reply` that returns each upstream datagram
;; unchanged: what a guest that inspects answers costs on top of forwarding
;; (scripts/bench.sh, forwarding table).
(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param $len i32) (result i32)
    i32.const 64)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1)
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
