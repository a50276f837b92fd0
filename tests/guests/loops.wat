;; A handler that loops until its time budget ends, on every datagram: a
;; hostile candidate for the shadow tests and examples/shadow_bench.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param i32 i32) (result i64) (loop (br 0)) i64.const 0))
