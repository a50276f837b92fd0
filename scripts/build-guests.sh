#!/usr/bin/env bash
# Rebuilds every committed guest module from its source, each with its own toolchain:
#   Rust (SDK)       guest/uppercase.wasm, examples/dns/dns.wasm,     wasm32-unknown-unknown
#                    examples/dns-proxy/dns_proxy.wasm,
#                    guest/sdk-probe.wasm (the SDK's test guest)
#   Rust (WASI)      examples/wasi-rust/whoami.wasm                   wasm32-wasip1
#   C (freestanding) examples/c/checksum.wasm                         clang + lld
#   C (WASI)         examples/wasi-c/sort.wasm                        clang + lld + wasi-libc
#   AssemblyScript   examples/assemblyscript/base64.wasm              npm (pinned in package-lock.json)
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
    cargo build --quiet --release --locked --target wasm32-unknown-unknown -p uppercase -p dns -p dns-proxy -p sdk-probe \
    --target-dir "$out/target"); then
    deliver "$out/target/wasm32-unknown-unknown/release/uppercase.wasm" guest/uppercase.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns.wasm" examples/dns/dns.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/dns_proxy.wasm" examples/dns-proxy/dns_proxy.wasm
    deliver "$out/target/wasm32-unknown-unknown/release/sdk_probe.wasm" guest/sdk-probe.wasm
  else
    fail "cargo build of the Rust guests failed"
  fi
else
  not_verified guest/uppercase.wasm examples/dns/dns.wasm examples/dns-proxy/dns_proxy.wasm guest/sdk-probe.wasm
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

if [ ${#unverified[@]} -gt 0 ]; then
  for m in "${unverified[@]}"; do
    echo "build-guests: ERROR: NO TOOLCHAIN: $m was NOT rebuilt, so it is NOT verified against its source" >&2
  done
  [ $status = 0 ] && status=3
fi
exit $status
