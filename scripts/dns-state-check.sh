#!/usr/bin/env bash
# docs/GUIDE.md's shared-state walk-through, run with real tools on loopback:
# dnsmasq as the resolver, wasmgate serving examples/dns-limit and
# examples/dns-cache in front of it (each from its example config), and dig as
# the client. Checks that a client past its bucket is REFUSED and stays so
# (penalized), that the cache answers a question the second time without the
# resolver, and the state metrics. Missing tools (Debian: dnsmasq-base,
# bind9-dnsutils) are installed when run as root; otherwise exits 3.
#   scripts/dns-state-check.sh [path/to/wasmgate]    (default: a debug build)
set -uo pipefail
cd "$(dirname "$0")/.."
say() { echo "dns-state-check: $*"; }
fail() {
  echo "dns-state-check: FAILED: $*" >&2
  for log in "$tmp"/*.log; do sed "s|^|  $(basename "$log"): |" "$log" >&2; done
  exit 1
}

if ! command -v dnsmasq >/dev/null || ! command -v dig >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base bind9-dnsutils >/dev/null ||
      { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base bind9-dnsutils >/dev/null; }
  fi
  if ! command -v dnsmasq >/dev/null || ! command -v dig >/dev/null; then
    say "dnsmasq and dig are not available (apt install dnsmasq-base bind9-dnsutils): NOT checked"
    exit 3
  fi
fi

bin=${1:-}
if [ -z "$bin" ]; then
  cargo build --quiet --locked --bin wasmgate || exit 1
  bin=target/debug/wasmgate
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

read -r gw resolver metrics < <(python3 -c '
import socket
def free(kind):
    s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", 0)); return s, s.getsockname()[1]
socks = [free(socket.SOCK_DGRAM) for _ in range(2)] + [free(socket.SOCK_STREAM)]
print(*[p for _, p in socks])')

# A TTL of 60 s on the local record: dnsmasq's default (0) would not be cached.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 \
  --port="$resolver" --address=/example.org/192.0.2.10 --local-ttl=60 --user="$(id -un)" \
  --pid-file="$tmp/dnsmasq.pid" 2>"$tmp/dnsmasq.log" &
pids+=($!)

# Serves examples/NAME.toml with its ports replaced by free ones.
serve() {
  local name=$1 port=$2 upstream=$3 metrics_port=$4
  # One substitution per line (`t`): a new port must not match a later pattern.
  # A roomy time budget: the counts checked here must not depend on a stall of a
  # shared host being charged to a guest (a timed-out guest loses its state).
  sed -e "s|^listen = \"127.0.0.1:93[0-9][0-9]\"$|listen = \"127.0.0.1:$metrics_port\"|;t" \
    -e "s|^listen = \"127.0.0.1:53[0-9][0-9]\"$|listen = \"127.0.0.1:$port\"|;t" \
    -e "s|^endpoints = .*|endpoints = [\"127.0.0.1:$upstream\"]|;t" \
    -e "s|^module = \"|module = \"$PWD/examples/|" \
    -e "/^module = /a timeout_ms = 1000" \
    "examples/$name.toml" >"$tmp/$name.toml"
  RUST_LOG=info "$bin" --config "$tmp/$name.toml" 2>"$tmp/$name.log" &
  pids+=($!)
}
scrape() {
  exec 3<>"/dev/tcp/127.0.0.1/$metrics" || return 1
  printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
ask() { dig +time=1 +tries=1 @127.0.0.1 -p "$gw" "$@"; }
wait_for_answer() {
  for _ in $(seq 50); do
    [ "$(ask +short example.org A 2>/dev/null)" = 192.0.2.10 ] && return 0
    sleep 0.2
  done
  return 1
}

serve dns-limit "$gw" "$resolver" "$metrics"
wait_for_answer || fail "dns-limit: example.org was not answered through the gateway"
# The first answer spent a token; a burst of 20 more must run into the bucket.
answered=1
for _ in $(seq 20); do
  [ "$(ask +short example.org A)" = 192.0.2.10 ] && answered=$((answered + 1))
done
[ "$answered" -ge 10 ] && [ "$answered" -le 13 ] || fail "dns-limit: $answered of 21 queries answered (a bucket of 10, 5 a second)"
ask example.org A | grep -q "status: REFUSED" || fail "dns-limit: past the bucket, not REFUSED"
sleep 1 # five tokens come back, but the client is penalized for 10 s
ask example.org A | grep -q "status: REFUSED" || fail "dns-limit: the penalty did not hold"
scrape | grep -q '^wasmgate_limit_total{listener="dns",result="denied"} 1$' || fail "dns-limit: not one denied limit in the metrics"
# What the handler counted itself (docs/ABI.md, "Metrics").
scrape | grep -q '^wasmgate_guest_dns_limit_penalties_total{listener="dns",role="active"} 1.0$' || fail "dns-limit: its own metrics do not show one penalty"
scrape | grep -q '^wasmgate_guest_dns_limit_refused_total{listener="dns",role="active",reason="penalized"} [1-9]' || fail "dns-limit: its own metrics do not show the refusals of a penalized client"
say "dns-limit: $answered of 21 answered, then REFUSED, and still REFUSED a second later (penalized)"
kill "${pids[-1]}"
wait "${pids[-1]}" 2>/dev/null

serve dns-cache "$gw" "$resolver" "$metrics"
wait_for_answer || fail "dns-cache: example.org was not answered through the gateway"
ask EXAMPLE.org A | grep -q "^EXAMPLE.org.*IN.*A.*192.0.2.10" || fail "dns-cache: EXAMPLE.org not answered from the cache"
for _ in $(seq 5); do ask +short example.org A >/dev/null; done
scrape | grep -q '^wasmgate_datagrams_forwarded_total{listener="dns"} 1$' || fail "dns-cache: the resolver was asked more than once"
scrape | grep -q '^wasmgate_state_entries{listener="dns"} 1$' || fail "dns-cache: not one cached answer in the state"
scrape | grep -q '^wasmgate_guest_dns_cache_lookups_total{listener="dns",role="active",result="miss"} 1.0$' || fail "dns-cache: its own metrics do not show one miss"
scrape | grep -q '^wasmgate_guest_dns_cache_lookups_total{listener="dns",role="active",result="hit"} [6-9]' || fail "dns-cache: its own metrics do not show six hits"
sleep 2
ttl=$(ask +noall +answer example.org A | awk '{print $2}')
[ -n "$ttl" ] && [ "$ttl" -ge 55 ] && [ "$ttl" -le 58 ] \
  || fail "dns-cache: after 2 s in the cache the TTL is ${ttl:-missing}, not 60 less the seconds it was kept"
say "dns-cache: seven queries, one reached the resolver; the others were answered from the cache, aged (TTL $ttl of 60)"
say "ok"
