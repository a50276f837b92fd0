#!/usr/bin/env python3
"""The levels of src/'s import graph: a module's level is one more than the
highest level among the modules it imports (test code left out), so level 1
imports nothing of the crate and the top level is the longest chain of
imports. Edges are read as ../shared/tools/import_graph.py reads them
(`crate::` paths, and `super::` between siblings); a cycle is cut where it is
met. Usage: python3 scripts/import_levels.py src
"""
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "src"
texts = {}
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(root, f)
        parts = os.path.relpath(path, src)[:-3].split(os.sep)
        if parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        name = "::".join(parts) or "crate"
        with open(path) as fh:
            texts[name] = re.split(r"#\[cfg\(test\)\]", fh.read())[0]

imports = {m: set() for m in texts}
for m, text in texts.items():
    for ref in re.findall(r"crate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)", text):
        parts = ref.split("::")
        for k in range(len(parts), 0, -1):
            target = "::".join(parts[:k])
            if target in texts:
                related = m.startswith(target + "::") or target.startswith(m + "::")
                if target != m and not related:
                    imports[m].add(target)
                break
    if "::" in m:
        parent = m.rsplit("::", 1)[0]
        for ref in re.findall(r"super::([a-z_][a-z0-9_]*)", text):
            target = parent + "::" + ref
            if target in texts and target != m:
                imports[m].add(target)

levels, visiting = {}, set()


def level(m):
    if m in levels:
        return levels[m]
    if m in visiting:
        return 0
    visiting.add(m)
    levels[m] = 1 + max((level(d) for d in imports[m]), default=0)
    visiting.discard(m)
    return levels[m]


for m in texts:
    if m != "crate":
        level(m)
levels.pop("crate", None)
top = max(levels.values())
print(f"{len(levels)} modules on {top} levels")
for n in range(top, 0, -1):
    print(f"  level {n}: " + ", ".join(sorted(m for m, v in levels.items() if v == n)))
