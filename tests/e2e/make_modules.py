#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# TorchScript modules for the inspection tests (tests/e2e/suites/torchscript.bash), exported the
# way a PyTorch user or a hostile operator would (torch.jit.script(module).save): benign ones of
# the kinds users write, which fedl must train, and hostile ones, which it must refuse before
# they run. All take the 64 features of the digits table and give 10 classes.
#
# Usage: make_modules.py OUTDIR   writes OUTDIR/NAME.pt for every module below.
import os
import sys
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- benign
class Residual(nn.Module):
    """Linear, LayerNorm, GELU and a residual connection."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.block = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1) / 16.0))
        h = h + F.gelu(self.norm(self.block(h)))
        return self.out(h)


class Conv(nn.Module):
    """Conv2d, BatchNorm (running statistics: only without DP-SGD), in-place ReLU, pooling, Dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = self.pool(self.act(self.bn(self.conv(x.view(-1, 1, 8, 8) / 16.0))))
        return self.fc(self.drop(torch.flatten(self.avg(h), 1)))


class Embed(nn.Module):
    """Embedding of the pixel values, activations in a Sequential, log_softmax."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 4)
        self.body = nn.Sequential(nn.Linear(256, 32), nn.SiLU(), nn.Dropout(0.1), nn.LeakyReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        idx = x.flatten(1).clamp(0, 16).long()
        return F.log_softmax(self.head(self.body(self.emb(idx).flatten(1))), dim=1)


# ---- hostile
class FileRead(nn.Module):
    """Reads a file the trainer can reach into its bias (the file's bytes leave in the update)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        with torch.no_grad():
            self.fc.bias.copy_(torch.from_file("/etc/os-release", shared=False, size=10, dtype=torch.float32))
        return self.fc(x.flatten(1))


class RowCopy(nn.Module):
    """Copies a training record into a row of its weight, past DP-SGD's clipping and noise."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        with torch.no_grad():
            self.fc.weight[0].copy_(x.flatten(1)[0])
        return self.fc(x.flatten(1))


class OtherMethod(nn.Module):
    """The same, from a method that forward calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    @torch.jit.export
    def keep(self, row: torch.Tensor):
        self.fc.weight.select(0, 1).mul_(0.0).add_(row)

    def forward(self, x):
        with torch.no_grad():
            self.keep(x.flatten(1)[0])
        return self.fc(x.flatten(1))


class Thief(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        w = self.lin.weight
        for i in range(2):
            w = w.detach()
        w.index_put_([torch.tensor([0])], x.flatten(1)[0:1])
        return self.lin(x.flatten(1))


class HiddenSubmodule(nn.Module):
    """A submodule that writes its own weight, through a loop and a detached view."""

    def __init__(self):
        super().__init__()
        self.inner = Thief()

    def forward(self, x):
        return self.inner(x)


class Uninitialised(nn.Module):
    """Adds uninitialised memory to its output (which may hold what the process had there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) + torch.empty(10) * 0.0


class Prints(nn.Module):
    """Prints its input: a side effect outside its outputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        print(x[0])
        return self.fc(x.flatten(1))


class SetsBuffer(nn.Module):
    """Replaces a buffer with a training record (buffers travel in updates)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("seen", torch.zeros(64))

    def forward(self, x):
        self.seen = x.flatten(1)[0].clone()
        return self.fc(x.flatten(1))


class SetState(nn.Module):
    """Code that torch.jit.load runs while it loads the module, before it can be inspected."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.secret = torch.zeros(10)

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.secret, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.secret = torch.from_file("/etc/os-release", shared=False, size=10, dtype=torch.float32)
        self.training = state[1]

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.secret * 0.0


class Saves(nn.Module):
    """Maps a file of the site's, shared, and writes its input there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = torch.from_file("/tmp/fedl-stolen", shared=True, size=64, dtype=torch.float32)
        out.copy_(x.flatten(1)[0])
        return self.fc(x.flatten(1)) + out.sum() * 0.0


# An operator of a library's own namespace, registered here so that it can be scripted (fedl's
# process has no such operator).
_library = torch.library.Library("fedltest", "DEF")
_library.define("steal(Tensor x) -> Tensor")
_library.impl("steal", lambda x: x * 1, "CPU")


class ForeignOp(nn.Module):
    """Calls torch.ops of a namespace that is not PyTorch's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.ops.fedltest.steal(x.flatten(1)))


MODULES = {
    "residual": Residual, "conv": Conv, "embed": Embed,
    "file-read": FileRead, "row-copy": RowCopy, "other-method": OtherMethod, "hidden-submodule": HiddenSubmodule,
    "uninitialised": Uninitialised, "prints": Prints, "sets-buffer": SetsBuffer, "setstate": SetState,
    "saves": Saves, "foreign-op": ForeignOp,
}

if __name__ == "__main__":
    torch.manual_seed(0)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, cls in MODULES.items():
        try:
            torch.jit.script(cls()).save(os.path.join(out, name + ".pt"))
        except Exception as e:  # a PyTorch that cannot script one: the test says which
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
