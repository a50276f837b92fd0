;; The smallest complete wasmgate guest (ABI v1): replies with the datagram unchanged.
;;   cargo run --release -- --module examples/echo.wat
(module
  ;; 2 pages = 128 KiB, room for the largest datagram (65,507 bytes).
  (memory (export "memory") 2)

  ;; The host asks where to put a datagram of $len bytes: always at address 0.
  (func (export "alloc") (param $len i32) (result i32)
    i32.const 0)

  ;; The datagram is at $ptr. Reply with the same bytes: (ptr << 32) | len.
  ;; Return -1 instead to send nothing back.
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
