#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""NumPy baseline for fedl_aggregate_bench: the weighted average (FedAvg) of the same update
files, done the way a Python framework does it: load each update (parse the safetensors header,
take the tensors as NumPy arrays), accumulate num_samples * update, divide by the total, add to
the base model. Flower's `aggregate` works the same way in float32 (but first keeps every update in
memory); this one streams, which only helps it.

Two ways to load are timed, and the faster one is reported as the baseline:
  fromfile  np.fromfile reads the whole file into memory (what safetensors.numpy.load_file does);
  memmap    np.memmap maps the file and the arithmetic reads the pages directly.

Usage: aggregate_numpy.py --dir DIR --n N [--repeat R]   (files written by fedl_aggregate_bench)
Prints one line per method and a last line "median_s=SECONDS" for the faster one.

  aggregate_numpy.py --dir DIR --n N --once fromfile|memmap --out FILE
runs one FedAvg and writes the result as a safetensors file, for timing the whole process
against `fedl aggregate` (bench/aggregate_cmd.sh).
"""
import argparse
import json
import os
import statistics
import struct
import time

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64}


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    return n, h


def load_fromfile(path):
    raw = np.fromfile(path, dtype=np.uint8)
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    h = json.loads(raw[8:8 + n].tobytes())
    meta = h.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {}
    for name, info in h.items():
        b, e = info["data_offsets"]
        tensors[name] = data[b:e].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, meta


def load_memmap(path):
    n, h = header(path)
    meta = h.pop("__metadata__", {})
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    data = mm[8 + n:]
    tensors = {}
    for name, info in h.items():
        b, e = info["data_offsets"]
        tensors[name] = data[b:e].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, meta


def fedavg(base_path, paths, load):
    acc = None
    total = 0.0
    for p in paths:
        tensors, meta = load(p)
        w = np.float32(float(meta["fedl.num_samples"]))
        if acc is None:
            acc = {k: v * w for k, v in tensors.items()}
        else:
            for k, v in tensors.items():
                acc[k] += v * w
        total += float(meta["fedl.num_samples"])
    base, _ = load(base_path)
    return {k: base[k] + acc[k] / np.float32(total) for k in base}


def write(path, tensors):
    """The tensors as a safetensors file (the header fedl writes: sorted names, padded to 8)."""
    header, pos = {}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": "F32" if t.dtype == np.float32 else "F64", "shape": list(t.shape),
                        "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--once", choices=["fromfile", "memmap"])
    ap.add_argument("--out")
    a = ap.parse_args()
    base = os.path.join(a.dir, "base.safetensors")
    paths = [os.path.join(a.dir, f"update-{i:03}.safetensors") for i in range(a.n)]
    if a.once:
        write(a.out, fedavg(base, paths, load_fromfile if a.once == "fromfile" else load_memmap))
        return
    best = None
    for name, load in (("fromfile", load_fromfile), ("memmap", load_memmap)):
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fedavg(base, paths, load)
            times.append(time.perf_counter() - t0)
            del out
        m = statistics.median(times)
        print(f"{name}: median {m * 1e3:.1f} ms over {a.repeat} runs")
        best = m if best is None else min(best, m)
    print(f"median_s={best:.6f}")


if __name__ == "__main__":
    main()
