#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# The floors of src/core (docs/ARCHITECTURE.md): a file in src/core/FLOOR may include only headers
# of its own floor and of the floors below it, in the order src/CMakeLists.txt lists them
# (fedl_core_floors). The libraries' link order catches calls upwards; this catches the headers,
# inline code and types, that the linker never sees. Prints each violation; exit 1 if any.
# Usage: check_floors.py SOURCE_DIR
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
cmake = (root / "src/CMakeLists.txt").read_text()
floors = re.search(r"set\(fedl_core_floors ([a-z_ ]+)\)", cmake).group(1).split()
rank = {f: i for i, f in enumerate(floors)}
bad = []
core = root / "src/core"
for path in sorted(core.rglob("*")):
    if not path.is_file():
        continue
    rel = path.relative_to(core)
    if len(rel.parts) < 2 or rel.parts[0] not in rank:
        bad.append(f"{path}: not inside a floor ({', '.join(floors)})")
        continue
    mine = rank[rel.parts[0]]
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        m = re.match(r'\s*#\s*include\s+"((core/([a-z_]+)/|cmd/|backends/)[^"]*)"', line)
        if not m:
            continue
        if m.group(3) is None:
            bad.append(f"{path}:{n}: core includes {m.group(1)}")
        elif m.group(3) not in rank or rank[m.group(3)] > mine:
            bad.append(f"{path}:{n}: floor {rel.parts[0]} includes {m.group(1)}, of a floor above it")
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
