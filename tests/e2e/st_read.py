#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# An independent safetensors reader (NumPy and the standard library only), written from the
# format's published description, used by the tests to check fedl's files from outside.
# Usage as a module: tensors, metadata = read(path); write(path, tensors, metadata)
import json
import struct
import sys

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    assert n % 8 == 0, "header not padded to 8 bytes"
    buf = data[8 + n:]
    meta = header.pop("__metadata__", {})
    tensors = {}
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, en = e["data_offsets"]
        assert b == end, f"{name}: not contiguous"
        end = en
        arr = np.frombuffer(buf[b:en], dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
        tensors[name] = arr
    assert end == len(buf), "trailing bytes"
    return tensors, meta


def write(path, tensors, metadata):
    """Writes `tensors` (name -> NumPy array) and `metadata` (str -> str) as safetensors."""
    codes = {np.dtype(v): k for k, v in DTYPES.items()}
    header = {"__metadata__": metadata} if metadata else {}
    body = b""
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.tobytes()
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


if __name__ == "__main__":
    t, m = read(sys.argv[1])
    print(json.dumps({"metadata": m, "tensors": {k: list(v.shape) for k, v in t.items()}}, sort_keys=True))
