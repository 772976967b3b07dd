#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# A raw peer of `fedl serve` (the standard library and the openssl CLI only), written from the
# frame layout in src/core/net/frame.hpp, used by tests/e2e/suites/network.bash to connect the way a
# misbehaving or hostile site would: without a certificate, with a foreign, revoked or expired
# one, offering TLS 1.2 only, or, once authenticated, sending garbage, oversized, truncated,
# unknown or wrong frames.
#
# Usage: fedl_peer.py --server HOST:PORT [--bundle DIR] [--cert F --key F | --no-cert] [--ca F]
#                     [--server-name NAME] [--tls12] [--timeout SEC] SCENARIO
# It prints one JSON object on stdout, the report the tests assert on:
#   handshake        "ok" or "failed"
#   handshake_error  why the handshake failed (the TLS alert, for instance)
#   welcome          the welcome frame's header, if one came
#   frames           [{"type", "header", "body_size"}] received (heartbeats left out)
#   sent             what the scenario sent, in words
#   closed           how the connection ended: "eof", "timeout", or the error (e.g. an alert)
#   alert            true if a TLS alert or handshake failure was seen at any point
#   rejected         (wrong-shape) the update's tensors and the shape offered
# Exit status 0 when the scenario ran (whatever the coordinator did), 2 on a usage error.
import argparse
import base64
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

MAGIC = b"FEDL"
VERSION = 1
HELLO, WELCOME, TASK, UPDATE, HEARTBEAT, DONE, ERROR, EVAL, RESULT = range(1, 10)
SECAGG_KEYS, SECAGG_PEERS, SECAGG_SHARES = 10, 11, 12
NAMES = {HELLO: "hello", WELCOME: "welcome", TASK: "task", UPDATE: "update", HEARTBEAT: "heartbeat",
         DONE: "done", ERROR: "error", EVAL: "eval", RESULT: "result"}


def prefix(kind, header_size, body_size):
    return MAGIC + struct.pack("<BBHIQ", VERSION, kind, 0, header_size, body_size)


def encode(kind, header, body=b""):
    text = json.dumps(header).encode("utf-8")
    return prefix(kind, len(text), len(body)) + text + body


class Peer:
    def __init__(self, args):
        self.args = args
        self.report = {"handshake": "failed", "frames": [], "alert": False}
        self.buf = b""
        self.sock = None
        self.last_sent = time.monotonic()

    # ---- connection
    def connect(self):
        a = self.args
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(a.ca)
        ctx.check_hostname = True
        if a.tls12:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
        host, port = a.server.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=a.timeout)
        # The coordinator logs a refused connection by its address: the test finds it by this port.
        self.report["local_port"] = raw.getsockname()[1]
        self.sock = ctx.wrap_socket(raw, server_hostname=a.server_name or host, do_handshake_on_connect=False)
        try:
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            self.report["handshake_error"] = str(e)
            self.report["alert"] = True
            self.report["closed"] = str(e)
            return False
        self.report["handshake"] = "ok"
        self.report["tls_version"] = self.sock.version()
        return True

    def send(self, data):
        self.sock.sendall(data)
        self.last_sent = time.monotonic()

    def send_frame(self, kind, header, body=b""):
        self.send(encode(kind, header, body))

    def _fill(self, deadline):
        """Reads more bytes into the buffer; False on end of stream or error (recorded)."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.report["closed"] = "timeout"
                return False
            # In TLS 1.3 the server checks the client certificate after the client's handshake is
            # done: a refusal arrives as an alert on the first read. Keep the line alive meanwhile.
            if now - self.last_sent >= self.args.heartbeat:
                try:
                    self.send_frame(HEARTBEAT, {})
                except (ssl.SSLError, OSError) as e:
                    self._closed_by(e)
                    return False
            if self.sock.pending() == 0:
                r, _, _ = select.select([self.sock], [], [], min(0.2, deadline - now))
                if not r:
                    continue
            try:
                data = self.sock.recv(1 << 20)
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLError, OSError) as e:
                self._closed_by(e)
                return False
            if not data:
                self.report["closed"] = "eof"
                return False
            self.buf += data
            return True

    def _closed_by(self, e):
        text = str(e)
        self.report["closed"] = text
        if isinstance(e, ssl.SSLError) and ("alert" in text.lower() or "handshake" in text.lower()):
            self.report["alert"] = True

    def read_frame(self, deadline):
        """The next frame other than a heartbeat, or None when the connection ends or time runs out."""
        while True:
            while len(self.buf) < 20:
                if not self._fill(deadline):
                    return None
            magic, version, kind, flags, hlen, blen = struct.unpack("<4sBBHIQ", self.buf[:20])
            if magic != MAGIC or version != VERSION:
                raise RuntimeError(f"the coordinator sent a bad frame prefix {self.buf[:20]!r}")
            while len(self.buf) < 20 + hlen + blen:
                if not self._fill(deadline):
                    return None
            header = json.loads(self.buf[20:20 + hlen]) if hlen else {}
            body = self.buf[20 + hlen:20 + hlen + blen]
            self.buf = self.buf[20 + hlen + blen:]
            if kind == HEARTBEAT:
                continue
            entry = {"type": NAMES.get(kind, str(kind)), "header": header, "body_size": blen}
            self.report["frames"].append(entry)
            return kind, header, body

    def read_until(self, kinds, seconds):
        """Frames until one of `kinds` arrives (returned) or the connection ends (None)."""
        deadline = time.monotonic() + seconds
        while True:
            f = self.read_frame(deadline)
            if f is None or f[0] in kinds:
                return f

    def drain(self, seconds):
        """Reads until the coordinator closes the connection or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while self.read_frame(deadline) is not None:
            pass

    def first_task(self):
        """hello, then the first task: (header, model bytes), or None when none came."""
        if self.hello() is None:
            return None
        f = self.read_until({TASK, DONE}, self.args.timeout)
        if f is None or f[0] != TASK:
            self.report["sent"] = "nothing (no task came)"
            return None
        return f[1], f[2]

    def hello(self):
        self.send_frame(HELLO, {"site": self.args.site, "version": VERSION})
        f = self.read_until({WELCOME, ERROR}, self.args.timeout)
        if f is not None and f[0] == WELCOME:
            self.report["welcome"] = f[1]
            return f[1]
        return None


# ---- safetensors and signatures (the layout of src/core/trust/update.cpp's update_signed_payload)
def st_parse(data):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    return header, meta, data[8 + n:]


def st_build(tensors, meta):
    """tensors: [(name, dtype, shape, bytes)] in file order."""
    header = {"__metadata__": meta}
    body = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body


def sign_payload(tensors, meta, key_path):
    listing = {name: {"dtype": dtype, "shape": shape, "sha256": hashlib.sha256(raw).hexdigest()}
               for name, dtype, shape, raw in tensors}
    payload = json.dumps({"fedl": "update-signature-v1", "metadata": meta, "tensors": listing},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        msg = os.path.join(tmp, "payload")
        with open(msg, "wb") as f:
            f.write(payload)
        sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", key_path, "-in", msg],
                             check=True, capture_output=True).stdout
    return base64.b64encode(sig).decode("ascii")


def wrong_shape_update(model, base_sha256, site, cert_path, key_path):
    """A signed update of `model` whose first tensor has one more row than the model's."""
    header, _, data = st_parse(model)
    sizes = {"F32": 4, "F64": 8}
    tensors = []
    changed = None
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        shape = list(e["shape"])
        if changed is None and shape:
            changed = {"tensor": name, "base_shape": list(shape)}
            shape[0] += 1
            changed["shape"] = shape
        count = 1
        for d in shape:
            count *= d
        tensors.append((name, e["dtype"], shape, bytes(count * sizes[e["dtype"]])))
    pem = open(cert_path).read()
    der = ssl.PEM_cert_to_DER_cert(pem)
    meta = {"fedl.kind": "update", "fedl.base_sha256": base_sha256, "fedl.num_samples": "100",
            "fedl.site": site, "fedl.cert_sha256": hashlib.sha256(der).hexdigest(), "fedl.certificate": pem}
    meta["fedl.signature"] = sign_payload(tensors, meta, key_path)
    return st_build(tensors, meta), changed


def st_build_raw(header_text, body=b""):
    """A safetensors file with this exact header text (padded to 8 bytes)."""
    text = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body


def bad_time_certificate(pem):
    """The certificate with its notBefore month set to 13 (DER left parseable, signature now wrong)."""
    der = bytearray(ssl.PEM_cert_to_DER_cert(pem))
    i = der.find(b"\x17\x0d")  # the first UTCTime, notBefore: YYMMDDHHMMSSZ
    der[i + 4:i + 6] = b"13"
    return ssl.DER_cert_to_PEM_cert(bytes(der))


def crafted_update(model, base_sha256, site, cert_path, key_path, case):
    """A signed update of `model` made hostile in the way `case` says (see --case)."""
    header, _, data = st_parse(model)
    tensors = []
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        count = 1
        for d in e["shape"]:
            count *= d
        value = 3e38 if case == "huge-values" else 0.001
        values = [value] * count
        if case == "nan-value":
            values[count // 2] = float("nan")  # one value, in the middle of every tensor
        raw = struct.pack("<%df" % count, *values) if e["dtype"] == "F32" else struct.pack("<%dd" % count, *values)
        tensors.append((name, e["dtype"], e["shape"], raw))
    pem = open(cert_path).read()
    der = ssl.PEM_cert_to_DER_cert(pem)
    meta = {"fedl.kind": "update", "fedl.base_sha256": base_sha256, "fedl.num_samples": "100",
            "fedl.site": site, "fedl.cert_sha256": hashlib.sha256(der).hexdigest(), "fedl.certificate": pem}
    if case == "bad-cert-time":
        meta["fedl.certificate"] = bad_time_certificate(pem)
    elif case == "many-samples":
        meta["fedl.num_samples"] = str(2 ** 53)
    elif case == "big-kind":
        meta["fedl.kind"] = "x" * ((4 << 20) - 64 * 1024)  # within what the coordinator takes beyond the model
    elif case == "utf8-kind":
        meta["fedl.kind"] = "k" * 62 + "\u00e9" * 4  # quoted to 64 bytes: cut inside a character
    meta["fedl.signature"] = sign_payload(tensors, meta, key_path)
    if case == "deep-header":
        nested = "[" * 1900000 + "]" * 1900000
        return st_build_raw('{"__metadata__":{"fedl.kind":"update"},"x":' + nested + "}")
    if case == "padded":
        return st_build(tensors, meta) + bytes(1 << 16)  # 64 KiB after the last tensor
    return st_build(tensors, meta)


CASES = ["bad-cert-time", "huge-values", "nan-value", "many-samples", "big-kind", "utf8-kind", "deep-header", "deep-metrics",
         "error-text", "twice", "padded", "plain", "eval-metrics", "bad-keys", "bad-shares"]


# ---- scenarios: each runs after a successful handshake
def scenario_hello(p):
    """hello, then hold the connection (answering nothing) until it is closed or --timeout."""
    if p.hello() is not None:
        p.drain(p.args.hold)


def scenario_handshake(p):
    """For refused certificates: hello, then read what comes (in TLS 1.3, the alert)."""
    try:
        p.send_frame(HELLO, {"site": p.args.site, "version": VERSION})
        p.report["sent"] = "hello"
    except (ssl.SSLError, OSError) as e:
        p._closed_by(e)
        return
    p.drain(p.args.timeout)


def scenario_garbage(p):
    if p.hello() is None:
        return
    p.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(64)))
    p.report["sent"] = "garbage bytes"
    p.drain(p.args.timeout)


def scenario_huge(p):
    w = p.hello()
    if w is None:
        return
    text = json.dumps({"round": w.get("round", 1), "task": 1, "attempt": 1}).encode()
    p.send(prefix(UPDATE, len(text), 1 << 40) + text)
    p.report["sent"] = "update prefix claiming a body of 2^40 bytes"
    if p.args.pause > 0:
        time.sleep(p.args.pause)  # the test reads the coordinator's memory meanwhile
    # A few body bytes, as a real sender would start: they must not be buffered up to 2^40.
    try:
        p.send(bytes(64 * 1024))
    except (ssl.SSLError, OSError) as e:
        p._closed_by(e)
        return
    p.drain(p.args.timeout)


def scenario_truncated(p):
    w = p.hello()
    if w is None:
        return
    text = json.dumps({"round": w.get("round", 1), "task": 1, "attempt": 1}).encode()
    p.send(prefix(UPDATE, len(text), 100000) + text + bytes(1000))
    p.report["sent"] = "update frame cut after 1000 of 100000 body bytes, then close"
    time.sleep(0.3)
    p.sock.shutdown(socket.SHUT_RDWR)
    p.sock.close()
    p.report["closed"] = "closed by this peer"


def scenario_unknown_type(p):
    if p.hello() is None:
        return
    p.send(encode(42, {"round": 1}))
    p.report["sent"] = "frame of type 42"
    p.drain(p.args.timeout)


def scenario_bad_hello(p):
    """A hello whose site is a number."""
    p.send_frame(HELLO, {"site": 42, "version": VERSION})
    p.report["sent"] = "hello with a number for the site"
    p.drain(p.args.timeout)


def scenario_bad_header(p):
    """An update whose header fields have the wrong types (a JSON object all the same)."""
    if p.hello() is None:
        return
    p.send_frame(UPDATE, {"round": "one", "task": [1], "attempt": None}, bytes(256))
    p.report["sent"] = "update with a string round and a list task id"
    p.drain(p.args.timeout)


def scenario_wrong_round(p):
    w = p.hello()
    if w is None:
        return
    wrong = int(w.get("round", 1)) + 1000
    p.send_frame(UPDATE, {"round": wrong, "task": 12345, "attempt": 1, "metrics": {}}, bytes(256))
    p.report["sent"] = f"update for round {wrong}"
    p.report["wrong_round"] = wrong
    p.drain(p.args.hold)


def scenario_wrong_shape(p):
    got = p.first_task()
    if got is None:
        return
    task, model = got
    body, changed = wrong_shape_update(model, task["base_sha256"], p.args.site, p.args.cert, p.args.key)
    p.send_frame(UPDATE, {"round": task["round"], "task": task["task"], "attempt": task.get("attempt", 1),
                          "metrics": {"num_samples": 100, "loss": 0.0, "steps": 1, "seconds": 0.0}}, body)
    p.report["sent"] = f"update for round {task['round']} with a wrong shape"
    p.report["round"] = task["round"]
    p.report["rejected"] = changed
    # Stay until the round is over (the next task or done), so that nothing sent is lost to a reset.
    p.read_until({TASK, DONE}, p.args.hold)


def scenario_hostile(p):
    """As an enrolled site: wait for a task and answer it the way --case says, then stay until the
    next task or done (so that nothing sent is lost to a reset)."""
    got = p.first_task()
    if got is None:
        return
    task, model = got
    case = p.args.case
    p.report["round"] = task["round"]
    p.report["ledger_head"] = task.get("ledger_head")
    head = {"round": task["round"], "task": task["task"], "attempt": task.get("attempt", 1)}
    metrics = {"num_samples": 100, "loss": 0.0, "steps": 1, "seconds": 0.0}
    if case == "eval-metrics":
        # A well-formed update whose federated evaluation lies: an accuracy of 5, a negative loss,
        # 10^15 samples, and a confusion matrix of another class count whose counts add up to
        # nothing it claims (join --eval-data --metrics-set classification sends these).
        metrics.update({"eval_accuracy": 5.0, "eval_loss": -1.0, "eval_samples": 10 ** 15, "eval_classes": 2,
                        "eval_confusion": [10 ** 15] * 4})
    if case == "error-text":
        # A line break followed by a forged log line, then 499 bytes in all and characters of two
        # bytes: the coordinator's 500-byte cut falls inside one.
        message = "x" * 100 + "\nfedl: info: round 99/99 done: 9 updates"
        message += "x" * (499 - len(message)) + "\u00e9" * 300
        p.send_frame(ERROR, {**head, "message": message})
        p.report["sent"] = f"an error report of {len(message.encode())} bytes with a forged log line"
    else:
        body = crafted_update(model, task["base_sha256"], p.args.site, p.args.cert, p.args.key, case)
        if case == "deep-metrics":
            # Built as text: Python's own json cannot nest this deep (which is the point).
            text = (json.dumps(head)[:-1] + ', "metrics": {"deep": ' + "[" * 30000 + "]" * 30000 + "}}").encode()
            p.send(prefix(UPDATE, len(text), len(body)) + text + body)
        else:
            p.send_frame(UPDATE, {**head, "metrics": metrics}, body)
        if case == "twice":
            # The same update again at once: the coordinator may be aggregating the first by now.
            time.sleep(p.args.pause)
            p.send_frame(UPDATE, {**head, "metrics": metrics}, body)
        p.report["sent"] = f"update for round {task['round']} ({case}, {len(body)} bytes)"
    f = p.read_until({TASK, DONE}, p.args.hold)
    if f is not None:
        p.report["next"] = {"type": NAMES[f[0]], "header": f[1]}


def scenario_secagg_garbage(p):
    """As an enrolled site under secure aggregation: answer the task's setup the way --case says
    (bad-keys: keys whose signature is garbage; bad-shares: shares of the wrong size), and stay
    until the connection ends or --hold passes."""
    got = p.first_task()
    if got is None:
        return
    task, _ = got
    setup = task.get("secure_aggregation")
    p.report["round"] = task["round"]
    p.report["setup"] = setup is not None
    if setup is None:
        return
    index = setup["index"]
    if p.args.case == "bad-keys":
        p.send_frame(SECAGG_KEYS, {"task": task["task"], "index": index, "c_public": os.urandom(32).hex(),
                                   "s_public": os.urandom(32).hex(), "seed_commitment": os.urandom(32).hex(),
                                   "signature": base64.b64encode(os.urandom(64)).decode()})
        p.report["sent"] = "keys with a garbage signature"
    else:
        to = 1 if index != 1 else 2
        p.send_frame(SECAGG_SHARES, {"task": task["task"], "shares": [{"from": index, "to": to, "sealed": "00" * 7}]})
        p.report["sent"] = "shares of 7 bytes"
    p.drain(p.args.hold)


def scenario_strangers(p):
    """Not TLS at all: hold --count bare TCP connections from --source, re-opening each one the
    coordinator closes, for --hold seconds; reports how many were opened and closed."""
    host, port = p.args.server.rsplit(":", 1)
    conns = []
    opened = closed = 0
    deadline = time.monotonic() + p.args.hold

    def open_one():
        nonlocal opened
        try:
            source = p.args.source if p.args.sources <= 1 else f"127.0.0.{2 + opened % p.args.sources}"
            c = socket.create_connection((host, int(port)), timeout=2, source_address=(source, 0))
            c.setblocking(False)
            conns.append(c)
            opened += 1
        except OSError:
            time.sleep(0.01)

    while len(conns) < p.args.count and time.monotonic() < deadline:
        open_one()
    while time.monotonic() < deadline:
        r, _, _ = select.select(conns, [], [], 0.1) if conns else ([], [], [])
        for c in r:
            try:
                data = c.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                conns.remove(c)
                c.close()
                closed += 1
        while len(conns) < p.args.count and time.monotonic() < deadline:
            open_one()
    for c in conns:
        c.close()
    p.report.update({"opened": opened, "closed_by_coordinator": closed, "handshake": "none"})


SCENARIOS = {
    "hello": scenario_hello,
    "handshake": scenario_handshake,
    "garbage": scenario_garbage,
    "huge": scenario_huge,
    "truncated": scenario_truncated,
    "unknown-type": scenario_unknown_type,
    "wrong-round": scenario_wrong_round,
    "bad-header": scenario_bad_header,
    "bad-hello": scenario_bad_hello,
    "wrong-shape": scenario_wrong_shape,
    "hostile": scenario_hostile,
    "strangers": scenario_strangers,
    "secagg-garbage": scenario_secagg_garbage,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--server", required=True)
    ap.add_argument("--bundle", help="a client bundle: client.crt, client.key, ca.crt, join.json")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--no-cert", action="store_true", help="present no client certificate")
    ap.add_argument("--ca", help="the CA that the coordinator's certificate must be issued by")
    ap.add_argument("--server-name")
    ap.add_argument("--site", help="the site named in hello (default: the bundle's)")
    ap.add_argument("--tls12", action="store_true", help="offer TLS 1.2 only")
    ap.add_argument("--timeout", type=float, default=10, help="seconds to wait for each answer")
    ap.add_argument("--hold", type=float, default=10, help="seconds to stay connected after the scenario")
    ap.add_argument("--heartbeat", type=float, default=0.5, help="seconds between heartbeats sent")
    ap.add_argument("--pause", type=float, default=0, help="huge: seconds to wait after the prefix; hostile "
                    "--case twice: between the two updates")
    ap.add_argument("--case", choices=CASES, default="huge-values", help="hostile, secagg-garbage: what to send")
    ap.add_argument("--count", type=int, default=256, help="strangers: connections to hold")
    ap.add_argument("--source", default="127.0.0.2", help="strangers: the local address to connect from")
    ap.add_argument("--sources", type=int, default=1, help="strangers: connect from 127.0.0.2 ... 127.0.0.(N+1) "
                    "in turn instead")
    a = ap.parse_args()
    if a.bundle:
        join = json.load(open(os.path.join(a.bundle, "join.json")))
        a.cert = a.cert or os.path.join(a.bundle, "client.crt")
        a.key = a.key or os.path.join(a.bundle, "client.key")
        a.ca = a.ca or os.path.join(a.bundle, "ca.crt")
        a.server_name = a.server_name or join.get("server_name")
        a.site = a.site or join.get("site") or os.path.basename(os.path.normpath(a.bundle))
    if a.no_cert:
        a.cert = a.key = None
    if not a.ca:
        ap.error("give --ca or --bundle")
    if a.cert and not a.key:
        ap.error("--cert needs --key")
    a.site = a.site or "nobody"
    p = Peer(a)
    try:
        if a.scenario == "strangers":
            SCENARIOS[a.scenario](p)
        elif p.connect():
            SCENARIOS[a.scenario](p)
    except (ConnectionError, socket.timeout) as e:
        p.report.setdefault("closed", str(e))
    finally:
        try:
            if p.sock is not None:
                p.sock.close()
        except OSError:
            pass
    json.dump(p.report, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
