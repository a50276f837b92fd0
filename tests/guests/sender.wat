(module
  (import "wasmgate" "send" (func $send (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  ;; "s…": send the datagram four times, reply nothing.
  ;; "r…": send it three times, then reply with it too.
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32)
    (local $codes i32)
    (loop $again
      (local.set $codes (i32.add (local.get $codes)
        (call $send (local.get $ptr) (local.get $len))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 3))))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 115))
      (then
        (drop (call $send (local.get $ptr) (local.get $len)))
        (return (i64.const -1))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
