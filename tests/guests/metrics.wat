;; A guest that defines and updates metrics (docs/ABI.md, "Metrics"), for the
;; tests. Every datagram counts in `requests{kind="even"|"odd"}` (by its
;; length), sets `last_len` and is observed in `size_bytes` (buckets 8, 64,
;; 512); the reply is the three calls' codes (i32, little-endian). A datagram
;; starting with `!` defines a counter named by the rest, `?` a counter
;; `tagged` labelled by the rest, `#` adds 1 to `requests{kind=<the rest>}`,
;; `*` adds 1 to `requests{kind="many"}` 70 times, `~` defines a histogram
;; with a bucket count of -1: the reply is then that (last) call's code.
(module
  (import "wasmgate" "metric_define" (func $define (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "metric_add" (func $add (param i32 i32 i32 f64) (result i32)))
  (import "wasmgate" "metric_set" (func $set (param i32 i32 i32 f64) (result i32)))
  (import "wasmgate" "metric_observe" (func $observe (param i32 i32 i32 f64) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "requests")
  (data (i32.const 16) "kind")
  (data (i32.const 32) "last_len")
  (data (i32.const 48) "size_bytes")
  ;; 8.0, 64.0, 512.0
  (data (i32.const 64) "\00\00\00\00\00\00\20\40\00\00\00\00\00\00\50\40\00\00\00\00\00\00\80\40")
  (data (i32.const 96) "even")
  (data (i32.const 104) "odd")
  (data (i32.const 112) "tagged")
  (global $requests (mut i32) (i32.const -1))
  (global $last (mut i32) (i32.const -1))
  (global $size (mut i32) (i32.const -1))

  (func (export "alloc") (param i32) (result i32) (i32.const 1024))

  (func $ensure
    (if (i32.lt_s (global.get $requests) (i32.const 0))
      (then
        (global.set $requests
          (call $define (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 16) (i32.const 4) (i32.const 0) (i32.const 0)))
        (global.set $last
          (call $define (i32.const 1) (i32.const 32) (i32.const 8) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
        (global.set $size
          (call $define (i32.const 2) (i32.const 48) (i32.const 10) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 3))))))

  ;; Replies with one code: 4 bytes at 200.
  (func $reply1 (param $code i32) (result i64)
    (i32.store (i32.const 200) (local.get $code))
    (i64.const 858993459204))

  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $first i32) (local $odd i32)
    (if (i32.gt_u (local.get $len) (i32.const 0))
      (then
        (local.set $first (i32.load8_u (local.get $ptr)))
        (if (i32.eq (local.get $first) (i32.const 33))
          (then (return (call $reply1
            (call $define (i32.const 0) (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1))
              (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))))
        (if (i32.eq (local.get $first) (i32.const 63))
          (then (return (call $reply1
            (call $define (i32.const 0) (i32.const 112) (i32.const 6)
              (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1)) (i32.const 0) (i32.const 0))))))
        (if (i32.eq (local.get $first) (i32.const 126))
          (then (return (call $reply1
            (call $define (i32.const 2) (i32.const 112) (i32.const 6) (i32.const 0) (i32.const 0)
              (i32.const 64) (i32.const -1))))))
        (if (i32.eq (local.get $first) (i32.const 42))
          (then
            (call $ensure)
            (i32.store (i32.const 120) (i32.const 0x796e616d)) ;; "many"
            (local.set $odd (i32.const 70))
            (loop $again
              (local.set $first (call $add (global.get $requests) (i32.const 120) (i32.const 4) (f64.const 1)))
              (local.set $odd (i32.sub (local.get $odd) (i32.const 1)))
              (br_if $again (local.get $odd)))
            (return (call $reply1 (local.get $first)))))
        (if (i32.eq (local.get $first) (i32.const 35))
          (then
            (call $ensure)
            (return (call $reply1
              (call $add (global.get $requests) (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1))
                (f64.const 1))))))))
    (call $ensure)
    (local.set $odd (i32.and (local.get $len) (i32.const 1)))
    (i32.store (i32.const 200)
      (call $add (global.get $requests)
        (select (i32.const 104) (i32.const 96) (local.get $odd))
        (select (i32.const 3) (i32.const 4) (local.get $odd))
        (f64.const 1)))
    (i32.store (i32.const 204)
      (call $set (global.get $last) (i32.const 0) (i32.const 0) (f64.convert_i32_u (local.get $len))))
    (i32.store (i32.const 208)
      (call $observe (global.get $size) (i32.const 0) (i32.const 0) (f64.convert_i32_u (local.get $len))))
    ;; (200 << 32) | 12
    (i64.const 858993459212)))
