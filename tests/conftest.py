"""Test set-up: without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
