#!/usr/bin/env bash
# Rebuilds every committed guest module from its source, each with its own toolchain:
#   Rust (SDK)       guest/uppercase.wasm, examples/dns/dns.wasm,     wasm32-unknown-unknown
#                    examples/dns-proxy/dns_proxy.wasm, examples/dns-limit/dns_limit.wasm,
#                    examples/dns-cache/dns_cache.wasm,
#                    guest/sdk-probe.wasm (the SDK's test guest)
#   Rust (WASI)      examples/wasi-rust/whoami.wasm                   wasm32-wasip1
#   C (freestanding) examples/c/checksum.wasm                         clang + lld
#   C (WASI)         examples/wasi-c/sort.wasm                        clang + lld + wasi-libc
#   AssemblyScript   examples/assemblyscript/base64.wasm              npm (pinned in package-lock.json)
#   Rust components  examples/rust-component/router.wasm,             wasm32-wasip2 (wit-bindgen)
#                    tests/guests/rust-probe/probe.wasm, tests/guests/rust-state/state.wasm
#   Python           examples/python/python.wasm,                     componentize-py (requirements.txt)
#                    tests/guests/python-probe/probe.wasm
#   JavaScript       examples/js/redact.wasm                          componentize-js (package-lock.json)
#
# componentize-py and componentize-js do not build reproducibly (two builds of the same
# source differ: their pre-initialised heap snapshots vary), so for their components
# --check compares what can be compared: the rebuilt component must pass `wasmgate check`
# and have exactly the committed one's world (exports with their types, and imports).
#
#   scripts/build-guests.sh           rebuild and copy the .wasm files into place
#   scripts/build-guests.sh --check   rebuild and fail if any differs from what is committed
#
# Missing toolchains are installed from the package registries (rustup, apt as root, npm).
# Exit status: 0 all rebuilt (and, with --check, identical); 1 a rebuild differs or a build
# failed; 3 some toolchain could not be had, so those modules were NOT verified.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
check=false
[ "${1:-}" = "--check" ] && check=true

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
unverified=()

say() { echo "build-guests: $*"; }
fail() {
  echo "build-guests: ERROR: $*" >&2
  status=1
}

# Debian packages, installed when missing (and when we may).
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing Debian packages: ${missing[*]} (install them: apt-get install ${missing[*]})"
    return 1
  fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

rust_target() {
  rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
  say "installing the $1 Rust target"
  rustup target add "$1"
}

# Puts a built module in place, or compares it with the committed one.
deliver() {
  local built=$1 committed=$2
  if [ ! -s "$built" ]; then
    fail "$committed was not built"
  elif $check; then
    if cmp -s "$built" "$committed"; then
      say "$committed matches its source ($(wc -c <"$built") bytes)"
    else
      fail "$committed differs from a rebuild of its source; run scripts/build-guests.sh and commit"
    fi
  else
    install -m 644 "$built" "$committed"
    say "wrote $committed ($(wc -c <"$committed") bytes)"
  fi
}

not_verified() {
  unverified+=("$@")
}

# No absolute path of this checkout may end up in a module: CI builds in another folder.
remap="--remap-path-prefix=$root=. --remap-path-prefix=$HOME=~"

# Rust with the SDK (ABI v1), one cargo workspace in guest/.
if rust_target wasm32-unknown-unknown; then
  if (cd guest && RUSTFLAGS="-C target-feature=+simd128 -C link-arg=-zstack-size=65536 $remap" \
    cargo build --quiet --release --locked --target wasm32-unknown-unknown -p uppercase -p dns -p dns-proxy -p dns-limit -p dns-cache -p sdk-probe \
    --target-dir "$out/target"); then
    deliver "$out/target/wasm32-unknown-unknown/release/uppercase.wasm" guest/uppercase.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns.wasm" examples/dns/dns.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns_proxy.wasm" examples/dns-proxy/dns_proxy.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns_limit.wasm" examples/dns-limit/dns_limit.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns_cache.wasm" examples/dns-cache/dns_cache.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/sdk_probe.wasm" guest/sdk-probe.wasm
  else
    fail "cargo build of the Rust guests failed"
  fi
else
  not_verified guest/uppercase.wasm examples/dns/dns.wasm examples/dns-proxy/dns_proxy.wasm examples/dns-limit/dns_limit.wasm \
    examples/dns-cache/dns_cache.wasm guest/sdk-probe.wasm
fi

# Rust with std, as a WASI command.
if rust_target wasm32-wasip1; then
  if (cd guest && RUSTFLAGS="$remap" cargo build --quiet --release --locked --target wasm32-wasip1 -p whoami \
    --target-dir "$out/target"); then
    deliver "$out/target/wasm32-wasip1/release/whoami.wasm" examples/wasi-rust/whoami.wasm
  else
    fail "cargo build of examples/wasi-rust failed"
  fi
else
  not_verified examples/wasi-rust/whoami.wasm
fi

# C: Debian's clang and lld; wasi-libc and the wasm32 compiler runtime for the WASI program.
cflags=(-O2 -s "-ffile-prefix-map=$root=.")
if apt_install clang lld && command -v wasm-ld >/dev/null; then
  if clang --target=wasm32 "${cflags[@]}" -nostdlib -Wl,--no-entry -Wl,--strip-all \
    -o "$out/checksum.wasm" examples/c/checksum.c; then
    deliver "$out/checksum.wasm" examples/c/checksum.wasm
  else
    fail "clang failed on examples/c/checksum.c"
  fi
  if apt_install wasi-libc libclang-rt-14-dev-wasm32; then
    if clang --target=wasm32-wasi "${cflags[@]}" -o "$out/sort.wasm" examples/wasi-c/sort.c; then
      deliver "$out/sort.wasm" examples/wasi-c/sort.wasm
    else
      fail "clang failed on examples/wasi-c/sort.c"
    fi
  else
    not_verified examples/wasi-c/sort.wasm
  fi
else
  not_verified examples/c/checksum.wasm examples/wasi-c/sort.wasm
fi

# AssemblyScript, the compiler version pinned by package-lock.json.
if command -v npm >/dev/null; then
  mkdir -p "$out/as"
  cp examples/assemblyscript/{package.json,package-lock.json,base64.ts} "$out/as/"
  if (cd "$out/as" && npm ci --silent --no-audit --no-fund >/dev/null && npm run --silent build >/dev/null); then
    deliver "$out/as/base64.wasm" examples/assemblyscript/base64.wasm
  else
    fail "the AssemblyScript build failed (npm ci && npm run build in examples/assemblyscript)"
  fi
else
  say "npm is not installed (Debian: apt-get install npm)"
  not_verified examples/assemblyscript/base64.wasm
fi

# Rust components: the wasm32-wasip2 target links a component directly. Their code
# layout depends on the directory they are built in, even with paths remapped (a
# checkout elsewhere gave the probe another function order, and no path in it), so
# they are built from a copy of their sources at one fixed path.
fixed=/tmp/wasmgate-guest-build
if rust_target wasm32-wasip2 && rm -rf "$fixed" && mkdir -p "$fixed" &&
  tar -C "$root" --exclude=target -cf - guest examples/dns examples/dns-proxy examples/dns-wire examples/dns-limit \
    examples/dns-cache examples/wasi-rust \
    examples/rust-component tests/guests/rust-probe tests/guests/rust-state wit | tar -C "$fixed" -xf -; then
  if (cd "$fixed/guest" && RUSTFLAGS="--remap-path-prefix=$fixed=. --remap-path-prefix=$HOME=~" \
    cargo build --quiet --release --locked --target wasm32-wasip2 \
    -p rust-component -p rust-probe -p rust-state --target-dir "$out/target"); then
    deliver "$out/target/wasm32-wasip2/release/rust_component.wasm" examples/rust-component/router.wasm
    deliver "$out/target/wasm32-wasip2/release/rust_probe.wasm" tests/guests/rust-probe/probe.wasm
    deliver "$out/target/wasm32-wasip2/release/rust_state.wasm" tests/guests/rust-state/state.wasm
  else
    fail "cargo build of the Rust components failed"
  fi
  rm -rf "$fixed"
else
  not_verified examples/rust-component/router.wasm tests/guests/rust-probe/probe.wasm tests/guests/rust-state/state.wasm
fi

# The world of a component as the gateway sees it (`wasmgate check`), to compare
# builds that are not reproducible byte for byte.
wasmgate_bin=""
world_of() {
  if [ -z "$wasmgate_bin" ]; then
    cargo build --quiet --locked --bin wasmgate || return 1
    wasmgate_bin=target/debug/wasmgate
  fi
  "$wasmgate_bin" check "$1" --no-cache --timeout-ms 5000 --max-memory 256MiB | sed -n '/^world:/,$p'
}

# Puts a component from a non-reproducible toolchain in place, or checks that the
# rebuilt one has the committed one's world.
deliver_world() {
  local built=$1 committed=$2
  if [ ! -s "$built" ]; then
    fail "$committed was not built"
  elif $check; then
    local want got
    want=$(world_of "$committed") || { fail "$committed does not pass wasmgate check"; return; }
    got=$(world_of "$built") || { fail "the rebuild of $committed does not pass wasmgate check"; return; }
    if [ -n "$want" ] && [ "$want" = "$got" ]; then
      say "$committed: rebuilt; not byte-identical (the toolchain is not reproducible), same world ($(echo "$want" | grep -c export) exports, $(echo "$want" | grep -c import) imports)"
    else
      fail "$committed: a rebuild has another world; run scripts/build-guests.sh and commit"
      diff <(echo "$want") <(echo "$got") >&2
    fi
  else
    install -m 644 "$built" "$committed"
    say "wrote $committed ($(wc -c <"$committed") bytes)"
  fi
}

# Python: componentize-py at the version pinned in examples/python/requirements.txt.
if command -v python3 >/dev/null || apt_install python3; then
  if python3 -m venv "$out/venv" >/dev/null 2>&1 || { apt_install python3-venv && python3 -m venv "$out/venv"; }; then
    if "$out/venv/bin/pip" install --quiet -r examples/python/requirements.txt; then
      (cd examples/python && "$out/venv/bin/componentize-py" -d ../../wit -w metered-handler componentize app \
        -o "$out/python.wasm" >/dev/null) || fail "componentize-py failed on examples/python/app.py"
      deliver_world "$out/python.wasm" examples/python/python.wasm
      (cd tests/guests/python-probe && "$out/venv/bin/componentize-py" -d ../../../wit -w handler componentize probe \
        -o "$out/python-probe.wasm" >/dev/null) || fail "componentize-py failed on tests/guests/python-probe/probe.py"
      deliver_world "$out/python-probe.wasm" tests/guests/python-probe/probe.wasm
    else
      say "cannot install componentize-py from PyPI"
      not_verified examples/python/python.wasm tests/guests/python-probe/probe.wasm
    fi
  else
    say "python3 cannot make a virtual environment (Debian: apt-get install python3-venv)"
    not_verified examples/python/python.wasm tests/guests/python-probe/probe.wasm
  fi
else
  not_verified examples/python/python.wasm tests/guests/python-probe/probe.wasm
fi

# JavaScript: componentize-js at the version pinned by examples/js/package-lock.json.
if command -v npm >/dev/null; then
  mkdir -p "$out/js"
  cp examples/js/{package.json,package-lock.json,redact.js} "$out/js/"
  mkdir -p "$out/wit" && cp wit/handler.wit "$out/wit/"
  if (cd "$out/js" && npm ci --silent --no-audit --no-fund >/dev/null &&
    npx componentize-js --wit ../wit --world-name metered-handler -d http fetch-event -o redact.wasm redact.js >/dev/null); then
    deliver_world "$out/js/redact.wasm" examples/js/redact.wasm
  else
    fail "the componentize-js build failed (npm ci && npm run build in examples/js)"
  fi
else
  not_verified examples/js/redact.wasm
fi

if [ ${#unverified[@]} -gt 0 ]; then
  for m in "${unverified[@]}"; do
    echo "build-guests: ERROR: NO TOOLCHAIN: $m was NOT rebuilt, so it is NOT verified against its source" >&2
  done
  [ $status = 0 ] && status=3
fi
exit $status
