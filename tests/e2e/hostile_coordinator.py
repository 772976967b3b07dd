#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# A hostile coordinator for tests/e2e/suites/site.bash: a TLS 1.3 server with the workspace's own
# server key (what an operator who turns against the sites holds), speaking fedl's frames
# (src/core/net/frame.hpp, through fedl_peer.py's reader) to one real `fedl join`, and sending it
# the tasks a curious or malicious coordinator would.
#
# Usage: hostile_coordinator.py --ws WS --port-file F [--timeout SEC] [--settle SEC] [--rcvbuf N] SCENARIO
# It writes its port to F once it listens, and prints one JSON report on stdout:
#   frames       [{"type", "header", "body_size", "sha256" (of the body), "at" (s since start)}]
#   connections  how many times the site connected
#   closed       how the last connection ended
#   notes        what the scenario did, step by step
# Scenarios (see each function): contract, labels, dp, big-body, deadline, no-read.
import argparse
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fedl_peer  # noqa: E402
from fedl_peer import DONE, ERROR, HEARTBEAT, HELLO, TASK, UPDATE, WELCOME, encode, prefix, st_build, st_build_raw, st_parse  # noqa: E402,F401

START = time.monotonic()


class Coordinator(fedl_peer.Peer):
    """One site's connection, from the coordinator's side."""

    def __init__(self, args):
        super().__init__(args)
        self.report["connections"] = 0
        self.report["notes"] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(os.path.join(args.ws, "pki/server.crt"), os.path.join(args.ws, "pki/server.key"))
        ctx.load_verify_locations(os.path.join(args.ws, "pki/ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx = ctx
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if args.rcvbuf:
            # Small, so that a coordinator that stops reading is felt by the site at once.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(self.listener.getsockname()[1]))
        os.rename(args.port_file + ".tmp", args.port_file)
        with open(os.path.join(args.ws, "models/global-000000.safetensors"), "rb") as f:
            self.model = f.read()
        with open(os.path.join(args.ws, "fedl.json")) as f:
            self.config = json.load(f)

    def note(self, text):
        self.report["notes"].append(f"{time.monotonic() - START:.1f}s {text}")

    def accept(self):
        """Waits for the site, reads its hello and welcomes it (heartbeat 1 s)."""
        self.listener.settimeout(self.args.timeout)
        raw, _ = self.listener.accept()
        self.sock = self.ctx.wrap_socket(raw, server_side=True)
        self.sock.setblocking(False)
        self.buf = b""
        self.report["connections"] += 1
        self.report["handshake"] = "ok"
        f = self.read_until({HELLO}, self.args.timeout)
        if f is None:
            raise RuntimeError("the site sent no hello")
        self.send_frame(WELCOME, {"round": 1, "rounds": 100, "heartbeat": 1.0})
        self.note(f"welcomed {f[1].get('site')}")
        # A moment for the test to read the site's memory before any task, heartbeats going.
        self.read_until(set(), self.args.settle)

    def send_frame(self, kind, header, body=b""):
        data = encode(kind, header, body)
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.01)
        self.last_sent = time.monotonic()

    def read_frame(self, deadline):
        f = super().read_frame(deadline)
        if f is not None:
            entry = self.report["frames"][-1]
            entry["sha256"] = hashlib.sha256(f[2]).hexdigest()
            if f[0] == UPDATE:
                entry["meta"] = {k: v for k, v in st_parse(f[2])[1].items() if k != "fedl.certificate"}
            entry["at"] = round(time.monotonic() - START, 2)
        return f

    def task(self, task, round_=1, model=None, training=None, **extra):
        body = self.model if model is None else model
        header = {"round": round_, "attempt": 1, "task": task, "deadline": 600.0, "seed": 1 + round_,
                  "training": dict(self.config["training"]) if training is None else training,
                  "base_sha256": hashlib.sha256(body).hexdigest()}
        header.update(extra)
        self.send_frame(TASK, header, body)

    def answer(self, task, seconds=60):
        """The site's next update or error for `task`."""
        deadline = time.monotonic() + seconds
        while True:
            f = self.read_frame(deadline)
            if f is None:
                return None
            if f[0] in (UPDATE, ERROR) and f[1].get("task") == task:
                return f


def training(c, **changes):
    t = dict(c.config["training"])
    t.update(changes)
    return {k: v for k, v in t.items() if v is not None}


def model_like(c, arch=None, classes=None, shapes=None):
    """The initial model with other metadata and, where `shapes` says, other tensor shapes."""
    header, meta, data = st_parse(c.model)
    meta = dict(meta)
    if arch is not None:
        meta["fedl.arch"] = arch
    if classes is not None:
        meta["fedl.classes"] = str(classes)
    tensors = []
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        shape = (shapes or {}).get(name, e["shape"])
        count = 1
        for d in shape:
            count *= d
        tensors.append((name, e["dtype"], shape, bytes(4 * count)))
    return st_build(tensors, meta)


def scenario_contract(c):
    """Tasks outside the bundle's contract; then one inside it, which must still be trained."""
    c.accept()
    header, meta, _ = st_parse(c.model)
    cases = [
        # 136 bytes that declare a logreg of 2^24 classes and hold no tensors.
        ("huge-classes", {"model": st_build([], {"fedl.kind": "model", "fedl.arch": meta["fedl.arch"],
                                                 "fedl.input_shape": meta["fedl.input_shape"],
                                                 "fedl.classes": "16777216"})}),
        ("other-arch", {"model": model_like(c, arch="mlp:1024,1024",
                                            shapes={n: [1024 if d == 32 else d for d in e["shape"]]
                                                    for n, e in header.items()})}),
        ("one-class", {"model": model_like(c, classes=1)}),
        ("nested-header", {"model": st_build_raw('{"__metadata__":{"a":' + "[" * 4000 + "]" * 4000 + "}}")}),
        ("wrong-base", {"base_sha256": "0" * 64}),
        ("epochs", {"training": training(c, epochs=100000)}),
        ("unknown-setting", {"training": training(c, shuffle=False)}),
    ]
    for i, (name, extra) in enumerate(cases):
        t0 = time.monotonic()
        c.task(100 + i, **extra)
        f = c.answer(100 + i, 30)
        c.note(f"{name}: {'no answer' if f is None else fedl_peer.NAMES[f[0]]} in {time.monotonic() - t0:.2f} s")
    c.task(200, round_=3)
    c.answer(200)
    c.task(201, round_=2)  # a round before the one it trained
    c.answer(201, 30)
    c.read_until(set(), 1)


def scenario_labels(c):
    """The model's classes are fewer than the site's labels: the trainer fails on the data."""
    c.accept()
    c.task(300)
    c.answer(300)
    c.read_until(set(), 1)


def scenario_dp(c):
    """DP-SGD weaker than the contract, zero-epoch runs, and one run asked for twice."""
    c.accept()
    dp = c.config["training"]["dp"]
    cases = [
        ("no-dp", training(c, dp=None)),
        ("tiny-noise", training(c, dp=dict(dp, noise_multiplier=1e-9))),
        ("big-delta", training(c, dp=dict(dp, delta=0.9))),
    ]
    for i, (name, t) in enumerate(cases):
        c.task(400 + i, training=t)
        f = c.answer(400 + i, 30)
        c.note(f"{name}: {'no answer' if f is None else fedl_peer.NAMES[f[0]]}")
    for i in range(20):
        c.task(500 + i, training=training(c, epochs=0))
        c.answer(500 + i, 30)
    c.note("20 zero-epoch tasks")
    c.task(600)
    time.sleep(0.05)
    c.task(600)
    c.answer(600)
    c.read_until(set(), 3)
    c.task(600)
    c.answer(600, 30)
    c.task(601, round_=2)  # a second run: past the site's budget
    c.answer(601, 60)
    c.read_until(set(), 2)


def scenario_big_body(c):
    """A task frame that announces a 3 GiB body and sends it slowly."""
    c.accept()
    header = json.dumps({"round": 1, "attempt": 1, "task": 700, "deadline": 600.0, "seed": 2,
                         "training": c.config["training"]}).encode()
    c.sock.setblocking(True)
    try:
        c.sock.sendall(prefix(TASK, len(header), 3 << 30) + header + bytes(1 << 20))
        c.note("announced 3 GiB")
    except OSError as e:
        c.note(f"send failed: {e}")
    c.sock.setblocking(False)
    c.read_until(set(), 5)
    c.note(f"then: {c.report.get('closed')}")


def scenario_deadline(c):
    """A task longer than its deadline; one replaced by a newer task; one cut by a lost connection."""
    c.accept()
    t0 = time.monotonic()
    c.task(800, deadline=1.0)
    f = c.answer(800, 60)
    c.note(f"deadline: {'no answer' if f is None else fedl_peer.NAMES[f[0]]} after {time.monotonic() - t0:.1f} s")
    c.task(801)
    time.sleep(2)
    t0 = time.monotonic()
    c.task(802, training=training(c, epochs=1))
    f = c.answer(802, 60)
    c.note(f"newer: {'no answer' if f is None else fedl_peer.NAMES[f[0]]} after {time.monotonic() - t0:.1f} s")
    c.task(803)
    time.sleep(2)
    c.sock.close()
    c.note("closed the connection while task 803 trains")
    c.accept()
    c.read_until(set(), 3)


def scenario_no_read(c):
    """Sends tasks, then heartbeats only, and never reads again."""
    c.accept()

    def heartbeats(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                c.send_frame(HEARTBEAT, {})
            except (ssl.SSLError, OSError) as e:
                c.note(f"the site closed: {e}")
                return False
            time.sleep(0.5)
        return True

    for i in range(3):
        try:
            c.task(900 + i, round_=1 + i)
        except (ssl.SSLError, OSError) as e:
            c.note(f"the site closed: {e}")
            return
        c.note(f"task {900 + i}")
        if not heartbeats(4):
            return
    if heartbeats(c.args.timeout):
        c.note("the site never closed")


SCENARIOS = {"contract": scenario_contract, "labels": scenario_labels, "dp": scenario_dp,
             "big-body": scenario_big_body, "deadline": scenario_deadline, "no-read": scenario_no_read}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ws", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--rcvbuf", type=int, default=0)
    p.add_argument("--settle", type=float, default=0, help="seconds between the welcome and the first task")
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    args = p.parse_args()
    args.heartbeat = 1.0
    c = Coordinator(args)
    try:
        SCENARIOS[args.scenario](c)
    except (OSError, ssl.SSLError, RuntimeError) as e:
        c.note(f"stopped: {e}")
    json.dump(c.report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
