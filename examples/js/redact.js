// A wasmgate handler in JavaScript: redacts log lines on their way through.
//
// Each datagram is a text line (syslog, JSON logs, ...). E-mail addresses
// become "<email>" and runs of 13 to 19 digits (card numbers), spaces or
// dashes allowed between them, become "<number>"; everything else is kept.
// The reply is the redacted line, never longer than the original.
//
// It counts what it redacts (docs/ABI.md, "Metrics"): `/metrics` shows
// `wasmgate_guest_redactions_total{kind="email"|"number"}`.
//
// Build (from this directory):
//   npm ci
//   npx componentize-js --wit ../../wit --world-name metered-handler -d http fetch-event -o redact.wasm redact.js
import log from "log";
import { define, add } from "wasmgate:handler/metrics@0.1.0";

// The counter's id, defined with the host on first use.
let redactions;

// Adds `n` to `redactions{kind}`; a refused call changes no answer.
function count(kind, n) {
  if (n === 0) {
    return;
  }
  try {
    redactions ??= define("counter", "redactions", ["kind"], []);
    add(redactions, [kind], n);
  } catch {
    // Counting is best effort.
  }
}

const EMAIL = /[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}/g;
const CARD = /\b\d(?:[ -]?\d){12,18}\b/g;
const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

export function handle(datagram, peer) {
  if (datagram.length === 0) {
    return undefined; // an empty datagram gets no answer
  }
  let line;
  try {
    line = decoder.decode(datagram);
  } catch {
    log(3, `not UTF-8 from ${peer}: dropped`);
    return undefined;
  }
  let emails = 0;
  let numbers = 0;
  const redacted = line
    .replace(EMAIL, () => {
      emails += 1;
      return "<email>";
    })
    .replace(CARD, () => {
      numbers += 1;
      return "<number>";
    });
  count("email", emails);
  count("number", numbers);
  return encoder.encode(redacted);
}
