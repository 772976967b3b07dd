#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# An independent client of `fedl __worker` (the standard library only), written from the frame
# layout in src/core/net/frame.hpp, used by tests/e2e/suites/worker.bash to drive the worker over
# its stdin and stdout as `fedl join` and `fedl serve` do.
# Usage as a module: w = Worker([fedl, "__worker", "--data", ...]); w.send(TASK, {...}, body);
# kind, header, body = w.receive(); w.close() -> exit status
import json
import struct
import subprocess

MAGIC = b"FEDL"
VERSION = 1
HELLO, WELCOME, TASK, UPDATE, HEARTBEAT, DONE, ERROR, EVAL, RESULT = range(1, 10)
NAMES = {TASK: "task", UPDATE: "update", ERROR: "error", EVAL: "eval", RESULT: "result",
         HELLO: "hello", WELCOME: "welcome", HEARTBEAT: "heartbeat", DONE: "done"}


def encode(kind, header, body=b"", version=VERSION, flags=0, magic=MAGIC):
    """One frame: 20-byte prefix (magic, version, type, flags, header and body lengths), header, body."""
    text = json.dumps(header).encode("utf-8")
    return magic + struct.pack("<BBHIQ", version, kind, flags, len(text), len(body)) + text + body


def read_exactly(stream, n):
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class Worker:
    def __init__(self, argv, stderr=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def send(self, kind, header, body=b""):
        self.send_raw(encode(kind, header, body))

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def receive(self):
        """(type, header dict, body bytes); raises EOFError if the worker closed its stdout."""
        prefix = read_exactly(self.proc.stdout, 20)
        if not prefix:
            raise EOFError("the worker closed its stdout")
        assert len(prefix) == 20, f"truncated frame prefix: {prefix!r}"
        assert prefix[:4] == MAGIC, f"bad magic in {prefix!r}"
        version, kind, flags, hlen, blen = struct.unpack("<BBHIQ", prefix[4:])
        assert version == VERSION and flags == 0, (version, flags)
        header = json.loads(read_exactly(self.proc.stdout, hlen).decode("utf-8")) if hlen else {}
        body = read_exactly(self.proc.stdout, blen)
        assert len(body) == blen, f"truncated body: {len(body)} of {blen} bytes"
        return kind, header, body

    def expect(self, kind):
        got, header, body = self.receive()
        assert got == kind, f"expected a {NAMES[kind]} frame, got {NAMES.get(got, got)}: {header}"
        return header, body

    def close(self, timeout=60):
        """Closes the worker's stdin and returns its exit status."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        rc = self.proc.wait(timeout=timeout)
        self.proc.stdout.close()
        return rc
