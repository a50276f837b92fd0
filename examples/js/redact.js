// A wasmgate handler in JavaScript: redacts log lines on their way through.
//
// Each datagram is a text line (syslog, JSON logs, ...). E-mail addresses
// become "<email>" and runs of 13 to 19 digits (card numbers), spaces or
// dashes allowed between them, become "<number>"; everything else is kept.
// The reply is the redacted line, never longer than the original.
//
// Build (from this directory):
//   npm ci
//   npx componentize-js --wit ../../wit --world-name handler -d http fetch-event -o redact.wasm redact.js
import log from "log";

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
  const redacted = line.replace(EMAIL, "<email>").replace(CARD, "<number>");
  return encoder.encode(redacted);
}
