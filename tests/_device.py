"""Where the tests run their tensors: on the CUDA GPU when the machine has one, otherwise on the CPU
with the Triton kernels in Triton's interpreter.

The interpreter can only be switched on before triton is imported, so one pytest process runs
the kernels either compiled for CUDA or interpreted on the CPU, never both: tests build their
tensors on ``DEVICE`` (or take the ``device`` fixture of conftest.py), so the same test checks the
kernels in the interpreter on a CPU machine and compiled on a GPU machine. tests/conftest.py
imports this module first, before anything imports triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# TRITON_INTERPRET=1 set by hand on a GPU machine also puts the tests on the CPU.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
ON_GPU = DEVICE == "cuda"
