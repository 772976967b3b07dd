#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""The PyTorch (Python) equivalent of `fedl train`, for bench/train_vs_pytorch.sh.

It does what `fedl train --arch SPEC` does, step for step, so that the two can be timed side by
side as whole processes:

  * reads the same data files itself (CSV, optionally gzip, label in the last column, features
    float32 as they are; IDX images, optionally gzip, uint8 / 255, shaped (N, 1, 28, 28), the
    labels file found by replacing "images-idx3" with "labels-idx1" in the name), so loading is
    part of the comparison;
  * builds the same zoo model (same module order and state_dict names as fedl's zoo.cpp, so the
    same seed gives the same initial weights), with torch.manual_seed(seed);
  * trains like backend.cpp: torch.manual_seed(seed) again, a torch.Generator seeded with `seed`
    for one randperm per epoch, batches by index_select, cross_entropy, zero_grad / backward /
    step, loss.item() after every step; SGD (with momentum) or Adam with default options;
  * optionally saves the trained weights (fedl always writes --save-model or --out).

It prints one JSON document on stdout. Times (seconds):

  total_seconds                 from the first line of this script (time.time() before any
                                import, incl. `import torch`) to the end, after saving
  import_seconds                the top of the script to the end of `import torch`
  load_seconds                  reading and decoding the data files
  seconds                       the training loop only (like fedl's "seconds")
  first_batch_seconds           the top of the script to the end of the first training step
                                (after its loss.item()); the counterpart of fedl's
                                first_batch_seconds, which fedl measures from main()
  first_batch_seconds_from_exec the same end point measured from the process start as the kernel
                                records it (/proc/self/stat starttime, in clock ticks, against
                                CLOCK_BOOTTIME): it includes the interpreter's own start-up;
                                its resolution is one clock tick (usually 10 ms); null where
                                /proc is not readable
  startup_before_script_seconds the interpreter's start-up before the first line (same source)
  peak_rss_mb                   resource.getrusage(RUSAGE_SELF).ru_maxrss, in MiB
"""
import time

T_TOP = time.time()  # as early as Python code can run: before every import
T_TOP_BOOT = time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else None

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T_IMPORTED = time.time()


def process_age_at_top():
    """Seconds between the kernel's start of this process and T_TOP, or None."""
    if T_TOP_BOOT is None:
        return None
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode()
        # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        start_ticks = int(fields[19])  # field 22 of the whole line: starttime
        return T_TOP_BOOT - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def open_maybe_gzip(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def load_csv(path, header, limit):
    with open_maybe_gzip(path) as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float64, skiprows=1 if header else 0,
                          max_rows=limit, ndmin=2)
    x = torch.from_numpy(np.ascontiguousarray(data[:, :-1], dtype=np.float32))
    y = torch.from_numpy(data[:, -1].astype(np.int64))
    return x, y


def read_idx(path):
    with open_maybe_gzip(path) as f:
        b = f.read()
    if len(b) < 4 or b[0] != 0 or b[1] != 0 or b[2] != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file")
    ndim = b[3]
    dims = struct.unpack(">" + "I" * ndim, b[4:4 + 4 * ndim])
    arr = np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_idx(path, labels_path, limit):
    if labels_path is None:
        d, name = os.path.split(path)
        if "images-idx3" not in name:
            raise SystemExit(f"{path}: cannot tell where its labels are; give --labels")
        labels_path = os.path.join(d, name.replace("images-idx3", "labels-idx1", 1))
    images = read_idx(path)
    labels = read_idx(labels_path)
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    images = images[:n]
    if images.ndim == 3:
        images = images.reshape(n, 1, images.shape[1], images.shape[2])
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255))
    y = torch.from_numpy(labels[:n].astype(np.int64))
    return x, y


def load(args):
    name = os.path.basename(args.data)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return load_csv(args.data, not args.no_header, args.limit_samples)
    if "-ubyte" in name or ".idx" in name:
        return load_idx(args.data, args.labels, args.limit_samples)
    raise SystemExit(f"{args.data}: unknown format (.csv[.gz] or IDX -ubyte[.gz])")


class MLP(nn.Module):
    def __init__(self, inputs, hidden, classes):
        super().__init__()
        layers = []
        prev = inputs
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.flatten(1))


class CNN(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = x.reshape(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LogReg(nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build_model(spec, sample_shape, classes):
    inputs = 1
    for d in sample_shape:
        inputs *= d
    if spec == "logreg":
        return LogReg(inputs, classes)
    if spec.startswith("mlp:"):
        return MLP(inputs, [int(h) for h in spec[4:].split(",")], classes)
    if spec == "cnn":
        if inputs != 28 * 28:
            raise SystemExit("cnn needs 28x28 single-channel samples")
        return CNN(classes)
    raise SystemExit(f"unknown --arch {spec} (logreg, mlp:H1[,H2...], cnn)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--labels")
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--limit-samples", type=int)
    p.add_argument("--arch", required=True)
    p.add_argument("--classes", type=int)
    p.add_argument("-e", "--epochs", type=int, default=1)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: the number of cores)")
    p.add_argument("--save-model", help="torch.save the trained state_dict here")
    args = p.parse_args()

    t_load = time.time()
    x_all, y_all = load(args)
    load_seconds = time.time() - t_load

    torch.set_num_threads(args.threads if args.threads else (os.cpu_count() or 1))
    classes = args.classes if args.classes else int(y_all.max()) + 1
    torch.manual_seed(args.seed)
    model = build_model(args.arch, list(x_all.shape[1:]), classes)

    t0 = time.time()
    torch.manual_seed(args.seed)
    params = list(model.parameters())
    if args.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=args.lr)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    n = x_all.shape[0]
    bs = max(args.batch_size, 1)
    gen = torch.Generator()
    gen.manual_seed(args.seed)
    model.train()
    steps = 0
    epoch_loss = 0.0
    first_batch = None
    for _epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen, dtype=torch.int64)
        loss_sum = 0.0
        for begin in range(0, n, bs):
            idx = perm[begin:begin + bs]
            x = x_all.index_select(0, idx)
            y = y_all.index_select(0, idx)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            l = loss.item()
            if first_batch is None:
                first_batch = time.time()
            loss_sum += l * idx.shape[0]
            steps += 1
        epoch_loss = loss_sum / n
    train_seconds = time.time() - t0

    if args.save_model:
        torch.save(model.state_dict(), args.save_model)

    t_end = time.time()
    age = process_age_at_top()
    out = {
        "runtime": f"PyTorch {torch.__version__} (Python {sys.version.split()[0]})",
        "arch": args.arch,
        "samples": n,
        "epochs": args.epochs,
        "steps": steps,
        "loss": epoch_loss,
        "threads": torch.get_num_threads(),
        "seconds": train_seconds,
        "load_seconds": load_seconds,
        "import_seconds": T_IMPORTED - T_TOP,
        "first_batch_seconds": None if first_batch is None else first_batch - T_TOP,
        "first_batch_seconds_from_exec": None if first_batch is None or age is None else first_batch - T_TOP + age,
        "startup_before_script_seconds": age,
        "total_seconds": t_end - T_TOP,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
