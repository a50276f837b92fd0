#!/usr/bin/env python3
"""Runs the command blocks of README.md and docs/*.md as a reader pastes them.

Every fenced block of shell commands carries a marker on the line before it:

  <!-- docs-check: run NAME [with-gateway] -->   run it (blocks with one NAME share a shell)
  <!-- docs-check: skip REASON -->               not run here, and why
  <!-- docs-check: expect -->                    an output block: each of its lines must be
                                                  printed by the run block before it (... or …
                                                  stands for anything)

A command block with no marker fails the check, so none escapes it silently.

A run block runs in bash, in a fresh directory that holds links to the
checkout's examples/, guest/ and templates/, one line at a time:
- `cargo run --release -- ARGS` runs the wasmgate binary given (the same
  program; building it in release is not what is checked);
- a line ending in `&` starts a server, as in a second terminal: the next line
  waits for a wasmgate's `serving` line (or half a second for anything else);
- every other line must exit 0, or N when its comment says `exit N`;
- a comment line `# -> TEXT` right after a command is text its output must hold;
- `with-gateway` first starts `wasmgate` as README's first command does.

Needs: bash, and what the blocks call (dnsmasq, dig, curl, tcpdump). A block
whose tools are missing is reported as NOT RUN and the script exits 3.

  scripts/docs-check.py [path/to/wasmgate] [NAME...]
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
MARKER = re.compile(r"<!--\s*docs-check:\s*(run|skip|expect)\b\s*(.*?)\s*-->")
# The first word of a line that makes a block a command block.
COMMANDS = {
    "cargo", "wasmgate", "dnsmasq", "dig", "curl", "kill", "cp", "mv", "tcpdump", "python3", "cd",
    "kubectl", "docker", "systemctl", "scripts/bench.sh", "scripts/fuzz.sh", "target/release/examples/bench",
    "target/release/examples/forward_bench", "for", "sleep", "npm", "rustup",
}
BLOCK_TIMEOUT = 120


def blocks(path):
    """(line, info, marker, lines) of every fenced block of `path`."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(text):
        if text[i].startswith("```"):
            info = text[i][3:].strip()
            j = i + 1
            while j < len(text) and not text[j].startswith("```"):
                j += 1
            marker = None
            k = i - 1
            while k >= 0 and not text[k].strip():
                k -= 1
            if k >= 0:
                m = MARKER.search(text[k])
                if m:
                    marker = (m.group(1), m.group(2))
            out.append((i + 1, info, marker, text[i + 1 : j]))
            i = j + 1
        else:
            i += 1
    return out


def is_command_block(info, lines):
    if info not in ("", "sh", "bash", "shell", "console"):
        return False
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        return s.split()[0] in COMMANDS
    return False


def commands(lines):
    """The block's commands (continuations joined), each with the `# -> ` lines after it."""
    out, pending = [], ""
    for line in lines:
        s = line.rstrip()
        if pending:
            pending += "\n" + s
            if not s.endswith("\\"):
                out.append([pending, []])
                pending = ""
            continue
        if not s.strip():
            continue
        if s.lstrip().startswith("# -> ") and out:
            out[-1][1].append(s.lstrip()[5:])
            continue
        if s.lstrip().startswith("#"):
            continue
        if s.endswith("\\"):
            pending = s
        else:
            out.append([s, []])
    return out


def split_comment(command):
    """(code, comment): a `#` outside quotes, after a blank, starts the comment."""
    quote, i = None, 0
    while i < len(command):
        c = command[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or command[i - 1] in " \t"):
            return command[:i].rstrip(), command[i + 1 :].strip()
        i += 1
    return command, ""


def pattern(expected):
    """`expected` as a regex in which `…` (or `...`) stands for anything."""
    return re.compile(".*".join(re.escape(p) for p in re.split(r"…|\.\.\.", expected.strip())))


PRELUDE = r"""
# `cargo run` execs the program (so `kill %1` reaches it); every command runs
# in a subshell of its own, so `exec` here replaces only that.
cargo() {
  if [ "$1" = run ] && [ "$2" = --release ] && [ "$3" = -- ]; then shift 3; exec "$WASMGATE_BIN" "$@"
  elif [ "$1" = run ] && [ "$2" = --release ] && [ $# -eq 2 ]; then exec "$WASMGATE_BIN"
  else echo "docs-check: cargo $* is not run here" >&2; return 97; fi
}
wasmgate() { exec "$WASMGATE_BIN" "$@"; }
await_serving() {  # $1: a background server's log
  for _ in $(seq 1 600); do grep -q 'serving' "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "docs-check: no serving line in $1" >&2; cat "$1" >&2; return 1
}
"""


def script_for(name, cmds, with_gateway, workdir):
    """A bash script that runs `cmds` and writes each command's status and output."""
    out = [PRELUDE]
    if with_gateway:
        out.append(f'"$WASMGATE_BIN" > {workdir}/bg0.log 2>&1 &\nawait_serving {workdir}/bg0.log || exit 90')
    for n, (command, _) in enumerate(cmds):
        code, _comment = split_comment(command)
        if code.endswith("&") and not code.endswith("&&"):
            log = f"{workdir}/bg{n + 1}.log"
            out.append(f"{code[:-1].rstrip()} > {log} 2>&1 &")
            if re.match(r"\s*(cargo run|wasmgate)\b", code):
                out.append(f"await_serving {log} || exit 90")
            else:
                out.append("sleep 0.5")
            out.append(f"echo 0 > {workdir}/status{n}")
        else:
            # `cd` and job control (`kill %1`, `wait`) act on this shell; the rest in a subshell.
            if re.match(r"\s*(cd|kill|wait)\b", code):
                out.append(f"{{ {code}\n}} > {workdir}/out{n} 2>&1 < /dev/null; echo $? > {workdir}/status{n}")
            else:
                out.append(f"( {code}\n) > {workdir}/out{n} 2>&1 < /dev/null; echo $? > {workdir}/status{n}")
    return "\n".join(out) + "\nexit 0\n"


def run(name, group, binary):
    """Runs the blocks of `group` in one shell; a list of failures."""
    cmds = []
    for _, _, lines in group["blocks"]:
        cmds += commands(lines)
    tools = ("dnsmasq", "dig", "curl", "tcpdump")
    missing = sorted({t for c, _ in cmds for t in tools if re.search(rf"\b{t}\b", c) and not shutil.which(t)})
    if missing:
        return None, f"needs {', '.join(missing)}"
    work = tempfile.mkdtemp(prefix=f"docs-check-{name}-")
    state = tempfile.mkdtemp(prefix="docs-check-state-")
    for d in ("examples", "guest", "templates", "wit"):
        os.symlink(os.path.join(ROOT, d), os.path.join(work, d))
    path = os.path.join(state, "run.sh")
    open(path, "w").write(script_for(name, cmds, group["with_gateway"], state))
    env = dict(os.environ, WASMGATE_BIN=binary, HOME=os.environ.get("HOME", work))
    failures = []
    # Its own session: whatever it left running is stopped with the group.
    proc = subprocess.Popen(
        ["bash", path], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
        if proc.returncode == 90:
            failures.append("a server did not start:\n" + stderr[-2000:])
    except subprocess.TimeoutExpired:
        failures.append(f"did not finish within {BLOCK_TIMEOUT} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    outputs = []
    for n, (command, wanted) in enumerate(cmds):
        try:
            status = int(open(os.path.join(state, f"status{n}")).read().strip() or "-1")
        except (OSError, ValueError):
            failures.append(f"never ran: {command}")
            continue
        try:
            output = open(os.path.join(state, f"out{n}"), errors="replace").read()
        except OSError:
            output = ""
        outputs.append(output)
        _, comment = split_comment(command)
        m = re.search(r"\bexit (\d+)", comment)
        expected = int(m.group(1)) if m else 0
        if status != expected:
            failures.append(f"exit {status} (expected {expected}): {command}\n{output[-1500:]}")
        for text in wanted:
            if not pattern(text).search(output):
                failures.append(f"output lacks {text!r}: {command}\n{output[-1500:]}")
    everything = "\n".join(outputs)
    for expect in group["expect"]:
        for line in expect:
            if line.strip() in ("", "…", "..."):
                continue
            if not any(pattern(line).fullmatch(o.strip()) for o in everything.split("\n")):
                failures.append(f"no output line is {line.strip()!r}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return failures, None


def main():
    args = sys.argv[1:]
    binary = os.path.abspath(args.pop(0)) if args and os.path.sep in args[0] else os.path.join(ROOT, "target/debug/wasmgate")
    only = set(args)
    if not os.access(binary, os.X_OK):
        sys.exit(f"docs-check: no wasmgate binary at {binary} (cargo build --bin wasmgate)")
    groups, unmarked, last_run = {}, [], None
    for path in FILES:
        for line, info, marker, lines in blocks(path):
            where = f"{path}:{line}"
            kind = marker[0] if marker else None
            if kind == "expect":
                if last_run is None:
                    unmarked.append(f"{where}: an expect block with no run block before it")
                else:
                    groups[last_run]["expect"].append(lines)
                continue
            if not is_command_block(info, lines):
                continue
            if kind is None:
                unmarked.append(f"{where}: a command block with no docs-check marker (run NAME or skip REASON)")
            elif kind == "skip":
                if not marker[1]:
                    unmarked.append(f"{where}: skip gives no reason")
                print(f"docs-check: skip {where}: {marker[1]}")
                last_run = None
            else:
                words = marker[1].split()
                name = words[0] if words else where
                group = groups.setdefault(name, {"blocks": [], "expect": [], "with_gateway": False, "where": where})
                group["blocks"].append((where, info, lines))
                group["with_gateway"] |= "with-gateway" in words
                last_run = name
    if unmarked:
        print("docs-check: FAILED:\n  " + "\n  ".join(unmarked), file=sys.stderr)
        return 1
    failed, not_run = False, []
    for name, group in groups.items():
        if only and name not in only:
            continue
        started = time.monotonic()
        failures, missing = run(name, group, binary)
        if missing:
            not_run.append(f"{name} ({group['where']}): {missing}")
            print(f"docs-check: NOT RUN {name} ({group['where']}): {missing}")
            continue
        took = time.monotonic() - started
        if failures:
            failed = True
            print(f"docs-check: FAILED {name} ({group['where']}):", file=sys.stderr)
            for f in failures:
                print("  " + f.replace("\n", "\n    "), file=sys.stderr)
        else:
            print(f"docs-check: ok {name} ({group['where']}) in {took:.1f} s")
    if failed:
        return 1
    return 3 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
