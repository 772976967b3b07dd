#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the synthetic seeds of tests/fuzz/corpus: frames and frame headers as fedl sends them,
CSV, IDX and NPY data sets (plain and gzip), small safetensors files and fedl.json variants.

Deterministic (fixed gzip mtime), standard library only. Seeds taken from real runs (ledgers and
fedl.json of e2e workspaces, a model written by fedl) are committed beside these as they are,
under names that do not start with "gen-"; this script rewrites only the gen-* files.

    tests/fuzz/make_corpus.py            # from the repository root
"""
import gzip
import json
import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"gen-{name}").write_bytes(data)


def gz(data):
    if isinstance(data, str):
        data = data.encode()
    return gzip.compress(data, mtime=0)


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


# --- frames (core/net/frame.hpp) -------------------------------------------------------------
FRAME_TYPES = {"hello": 1, "welcome": 2, "task": 3, "update": 4, "heartbeat": 5, "done": 6,
               "error": 7, "eval": 8, "result": 9}


def frame(kind, header, body=b""):
    text = compact(header).encode() if header is not None else b""
    return b"FEDL" + struct.pack("<BBHIQ", 1, FRAME_TYPES[kind], 0, len(text), len(body)) + text + body


SHA = "2d12142916d30cfb9507ea501f582d89088d7ab2ae958a6117afb29f82719add"
TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.0, "prox_mu": 0.0}
TRAINING_DP = dict(TRAINING, dp={"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5})
ORDERS = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5] + list(range(5, 64)) + [128, 256, 512]
ACCOUNT = {"orders": ORDERS, "rdp": [round(0.002 * a, 6) for a in ORDERS], "runs": 2}
HEAD = {"seq": 5, "sha256": SHA, "ca": "7f98ad67f44ce6637ea99b5afea9aff53a3f5ef2a5fc04fd318dd568ee0c7374",
        "sig": "+2s9iG1ZcgsKnIPoANda8qwjsvjmsAdxV2Rl6GUz/eEhC1AM3kcW/O8VZqatk+4Dq647W0FnggYnLFp0KFkYAA=="}
DP_REPORT = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.25, "steps": 4, "delta": 1e-5,
             "epsilon": 0.9}


def frames():
    write("frame", "hello-heartbeat", frame("hello", {"site": "site-1", "version": 1}) + frame("heartbeat", None))
    write("frame", "welcome", frame("welcome", {"round": 1, "rounds": 10, "heartbeat": 5.0,
                                               "ca_fingerprint": SHA}))
    write("frame", "task", frame("task", {"round": 3, "attempt": 1, "task": 7, "deadline": 59.5, "seed": 3,
                                         "training": TRAINING, "base_sha256": SHA}, bytes(range(48))))
    write("frame", "update", frame("update", {"round": 3, "task": 7, "attempt": 1,
                                             "metrics": {"num_samples": 120, "steps": 4, "seconds": 0.5}},
                                   b"\x10" + bytes(47)))
    write("frame", "done-error", frame("done", {"rounds": 10, "reason": "all rounds done"}) +
          frame("error", {"message": "protocol error: hello sent twice", "code": 1}))
    write("frame", "eval-result", frame("eval", {}, bytes(16)) +
          frame("result", {"accuracy": 0.93, "loss": 0.21, "samples": 360}))


SECAGG_ADVERT = {"index": 1, "c_public": "11" * 32, "s_public": "22" * 32, "seed_commitment": "33" * 32,
                 "signature": "c2lnbmF0dXJl"}


def wire():
    # Selector byte (tests/fuzz/wire.cpp, enum Receiver), then the header text.
    seeds = {
        "coordinator-hello": (0, {"site": "site-1", "version": 1}),
        "coordinator-update": (1, {"round": 3, "task": 7, "attempt": 1,
                                   "metrics": {"num_samples": 120, "steps": 4, "seconds": 0.5, "loss": 0.3}}),
        "coordinator-error": (2, {"message": "the trainer failed: out of memory", "task": 7, "round": 3}),
        "coordinator-error-utf8": (2, {"message": "caf\u00e9 \u2026 \U0001f600 \t\u0085 end", "task": 7}),
        "site-welcome": (3, {"round": 1, "rounds": 10, "heartbeat": 5.0, "ca_fingerprint": SHA}),
        "site-welcome-privacy": (3, {"round": 4, "rounds": 10, "heartbeat": 2.5, "ca_fingerprint": SHA,
                                     "privacy": ACCOUNT}),
        "site-task": (4, {"round": 3, "attempt": 1, "task": 7, "deadline": 59.5, "seed": 3, "training": TRAINING,
                          "base_sha256": SHA, "ledger_head": HEAD}),
        "site-task-dp": (4, {"round": 3, "attempt": 2, "task": 8, "deadline": 12.0, "seed": 3,
                             "training": TRAINING_DP, "base_sha256": SHA}),
        "site-done": (5, {"rounds": 10, "reason": "all rounds done", "ledger_head": HEAD}),
        "site-error": (6, {"message": "site site-9 is not a client of this federation", "code": 3}),
        "site-error-replaced": (6, {"message": "replaced by a newer connection of the same site", "code": 1,
                                    "replaced": True}),
        "trainer-update": (7, {"round": 3, "num_samples": 120, "steps": 4, "seconds": 0.5, "loss": 0.3}),
        "trainer-update-dp": (7, {"round": 3, "num_samples": 120, "steps": 4, "seconds": 0.5, "dp": DP_REPORT}),
        "trainer-error": (0x17, {"message": "epsilon would pass --max-epsilon", "code": 4}),
        # Secure aggregation (not sent by a command yet): selectors 8 to 15.
        "secagg-keys": (8, SECAGG_ADVERT | {"task": 7}),
        "secagg-peers": (9, {"task": 7, "peers": [SECAGG_ADVERT | {"certificate": "-----BEGIN CERTIFICATE-----"}]}),
        "secagg-shares": (10, {"task": 7, "shares": [{"from": 1, "to": 2, "sealed": "ab" * 104}]}),
        "secagg-input": (11, {"task": 7, "clipped": 3, "range": 0.5, "max_samples": 1000, "signature": "c2ln"}),
        "secagg-input-complaint": (11, {"task": 7, "complaint": 3, "signature": "c2ln"}),
        "secagg-unmask": (12, {"task": 7, "survivors": [1, 2, 4, 5]}),
        "secagg-unmask-signed": (12, {"task": 7, "survivors": [1, 2, 4, 5],
                                      "signatures": [{"index": 1, "signature": "c2ln"}, {"index": 4, "signature": "c2ln"}]}),
        "secagg-signature": (15, {"task": 7, "index": 2, "signature": "c2ln"}),
        "secagg-reveal": (13, {"task": 7, "index": 2, "seeds": [{"owner": 1, "x": 2, "y": [1, 2, 3, 4, 5]}],
                               "keys": [{"owner": 3, "x": 2, "y": [6, 7, 8, 9, 10]}]}),
        "secagg-setup": (14, {"sites": ["site-1", "site-2", "site-3", "site-4"], "index": 2, "threshold": 2,
                              "neighbours": 3, "graph_seed": 77, "length": 1001, "range": 0.25,
                              "max_samples": 500}),
    }
    for name, (selector, header) in seeds.items():
        write("wire", name, bytes([selector]) + compact(header).encode())


# --- data sets (core/format/dataset.hpp) -------------------------------------------------------
CSV = "sepal_length,sepal_width,petal_length,petal_width,label\n5.1,3.5,1.4,0.2,0\n7.0,3.2,4.7,1.4,1\n" \
      "6.3,3.3,6.0,2.5,2\n4.9,3.0,1.4,0.2,0\n"
CSV_NOHEADER = "1,0.5,1e-3,-2\n0,0.25,3,4.5\n"


def datasets():
    # CSV: option byte (tests/fuzz/csv.cpp), then the file.
    write("csv", "header", b"\x00" + CSV.encode())
    write("csv", "header-gz", b"\x00" + gz(CSV))
    write("csv", "label-by-name-limit", bytes([0x04 | 0x08 | 0x10]) + CSV.replace("label", "label").encode())
    write("csv", "no-header-first-column", bytes([0x01 | 0x02]) + CSV_NOHEADER.encode())
    write("csv", "crlf-quoted", b"\x00" + b'"a","b","y"\r\n"1","2","0"\r\n\r\n3,4,1\r\n')

    # IDX: option byte, then split_two: LE16 size of the labels, images, labels.
    def idx(dims, data):
        return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(data)

    images = idx([3, 2, 2], [0, 255, 128, 7, 1, 2, 3, 4, 250, 251, 252, 253])
    labels = idx([3], [1, 0, 9])
    for name, (im, lb, flags) in {"3x2x2": (images, labels, 0), "3x2x2-gz": (gz(images), gz(labels), 0),
                                  "beside-limit": (images, labels, 0x01 | 0x08),
                                  "flat": (idx([2, 3], [1, 2, 3, 4, 5, 6]), idx([2], [0, 1]), 0)}.items():
        write("idx", name, bytes([flags]) + struct.pack("<H", len(lb)) + im + lb)

    # NPY: option byte, then split_two: LE16 size of the labels, features, labels.
    def npy(descr, shape, data, version=1):
        shape_text = "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
        header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape_text)
        pre = 10 if version == 1 else 12
        header += " " * ((64 - (pre + len(header) + 1) % 64) % 64) + "\n"
        size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
        return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode() + data

    f32 = npy("<f4", [3, 2], struct.pack("<6f", 0.5, -1, 2, 3.25, 0, 1e-3))
    i64 = npy("<i8", [3], struct.pack("<3q", 2, 0, 1))
    f64 = npy("<f8", [2, 1, 2], struct.pack("<4d", 1, 2, 3, 4), version=2)
    u8 = npy("|u1", [2], bytes([1, 0]))
    for name, (x, y, flags) in {"f4-i8": (f32, i64, 0), "f4-i8-gz": (gz(f32), gz(i64), 0),
                                "f8-v2-u1-beside-limit": (f64, u8, 0x01 | 0x08)}.items():
        write("npy", name, bytes([flags]) + struct.pack("<H", len(y)) + x + y)


# --- safetensors (core/format/safetensors.hpp) --------------------------------------------------
def safetensors(tensors, metadata=None):
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    body = b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
        body += data
    text = compact(header)
    text += " " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + body


def safetensors_seeds():
    write("safetensors", "two-f32", safetensors([("linear.weight", "F32", [2, 3], struct.pack("<6f", *range(6))),
                                                 ("linear.bias", "F32", [2], struct.pack("<2f", 0.5, -0.5))],
                                                {"fedl.format": "1", "fedl.num_samples": "120"}))
    write("safetensors", "mixed-dtypes", safetensors([("a", "F64", [1], struct.pack("<d", 1.5)),
                                                      ("b", "I32", [2], struct.pack("<2i", 1, -1)),
                                                      ("c", "BF16", [2], b"\x80\x3f\x00\x40"),
                                                      ("d", "BOOL", [3], b"\x01\x00\x01"),
                                                      ("e", "U8", [0], b"")]))
    write("safetensors", "empty", safetensors([]))
    # A site's update: what the coordinator reads from its metadata (fedl.dp, a JSON text).
    write("safetensors", "update-dp", safetensors([("linear.bias", "F32", [2], struct.pack("<2f", 0.01, -0.02))],
                                                  {"fedl.format": "1", "fedl.num_samples": "120",
                                                   "fedl.dp": compact(DP_REPORT)}))


# --- fedl.json (core/config/config.hpp) ---------------------------------------------------------
def configs():
    base = {"version": 1, "model": {"arch": "mlp:32", "input_shape": "64", "classes": 10},
            "clients": ["site-1", "site-2"], "rounds": 5, "strategy": "fedavg", "seed": 1}
    write("config", "minimal", compact({"version": 1, "model": {"arch": "logreg", "input_shape": "1,28,28",
                                                                "classes": 10}}))
    write("config", "dp-privacy", json.dumps(dict(base, training=TRAINING_DP,
                                                  privacy={"clip_norm": 1.0, "noise_multiplier": 1.0,
                                                           "max_epsilon": 8.0, "delta": 1e-5}), indent=2))
    write("config", "server-torchscript", json.dumps(dict(
        base, model={"arch": "torchscript", "input_shape": "4", "classes": 3, "torchscript": "model.pt"},
        server={"listen": "127.0.0.1:7443", "names": ["localhost"], "min_clients": 1, "clients_per_round": 2,
                "round_timeout": 30.0, "wait_timeout": 0.0},
        server_optimizer={"lr": 1.0, "momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
        pki={"valid_days": 30}), indent=2))


def main():
    if len(sys.argv) > 1:
        print(__doc__)
        return 2
    for p in ROOT.glob("*/gen-*"):
        p.unlink()
    frames()
    wire()
    datasets()
    safetensors_seeds()
    configs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
