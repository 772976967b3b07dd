#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# Exports a small classifier for 64 features (the digits table) as TorchScript, the way a
# PyTorch user would: torch.jit.script(model).save(path). torch.jit.script needs the source in
# a file, hence this script. Usage: export_torchscript.py OUT.pt
import sys

import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh())
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.head(self.body(x.flatten(1) / 16.0))


torch.manual_seed(0)
torch.jit.script(Net()).save(sys.argv[1])
