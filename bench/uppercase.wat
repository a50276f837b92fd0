;; The default guest's work in WAT, for examples/bench's `--guest-metrics`:
;; the reply is the datagram in uppercase (ASCII). bench.rs makes a second
;; module from this text with the line after `;; count here` uncommented:
;; one `metric_add` per datagram to a counter with a label, defined on the
;; first datagram, so that the two differ by the update alone.
(module
  (import "wasmgate" "metric_define" (func $define (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "metric_add" (func $add (param i32 i32 i32 f64) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "datagrams")
  (data (i32.const 16) "result")
  (data (i32.const 32) "upper")
  (global $id (mut i32) (i32.const -1))
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func $count
    (if (i32.lt_s (global.get $id) (i32.const 0))
      (then (global.set $id
        (call $define (i32.const 0) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 6) (i32.const 0) (i32.const 0)))))
    (drop (call $add (global.get $id) (i32.const 32) (i32.const 5) (f64.const 1))))
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32) (local $b i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $b (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (if (i32.lt_u (i32.sub (local.get $b) (i32.const 97)) (i32.const 26))
          (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.sub (local.get $b) (i32.const 32)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    ;; count here
    ;; (call $count)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))
