#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Rewrites a workspace's ledger as a coordinator that holds pki/server.key could: applies a
Python statement to the bodies, then re-chains (prev) and re-signs (Ed25519, with the openssl
command) every line from the first changed one. Tests use it to make a ledger whose chain and
signatures verify but whose recorded values lie, which only a recomputation can catch.

Usage: resign_ledger.py WS 'STATEMENT'   (STATEMENT sees L, the list of entries, and may change
their "body" fields; an empty statement re-signs the ledger unchanged)
"""
import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile


class RawFloat(float):
    """A number as fedl wrote it: nlohmann's writer does not always print the shortest form
    (0.0043058929999999496 where Python prints 0.00430589299999995), and fedl refuses a line that
    is not in its own canonical form, so numbers the statement leaves alone keep their text."""

    def __new__(cls, text):
        value = super().__new__(cls, text)
        value.text = text
        return value


def dumps(entry):
    """The entry as compact JSON with sorted keys, unchanged numbers in their original text."""
    texts = []

    def walk(x):
        if type(x) is RawFloat:
            texts.append(x.text)
            return f"\0{len(texts) - 1}\0"
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    text = json.dumps(walk(entry), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: texts[int(m.group(1))], text)


def sign(key, payload):
    with tempfile.NamedTemporaryFile() as f:
        f.write(payload)
        f.flush()
        sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", key, "-in", f.name],
                             check=True, capture_output=True).stdout
    return base64.b64encode(sig).decode()


def main():
    ws, statement = sys.argv[1], sys.argv[2]
    path = f"{ws}/ledger.jsonl"
    L = [json.loads(line, parse_float=RawFloat) for line in open(path, encoding="utf-8")]
    before = [json.dumps(e, sort_keys=True) for e in L]
    exec(statement, {"L": L})
    changed = next((i for i, e in enumerate(L) if json.dumps(e, sort_keys=True) != before[i]), 0)
    lines = []
    prev = "0" * 64
    for i, e in enumerate(L):
        if i >= changed:
            e["prev"] = prev
            e.pop("sig", None)
            # What fedl signs: the entry without "sig", compact, keys sorted (nlohmann's dump).
            payload = dumps(e).encode()
            e["sig"] = sign(f"{ws}/pki/server.key", payload)
        line = dumps(e)
        lines.append(line)
        prev = hashlib.sha256(line.encode()).hexdigest()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
