"""The seeded task samplers of ``theria_kernels._tasks`` (one numpy implementation), as torch tensors.

Only the conversion lives here; ``theria_kernels._tasks`` documents the task families, and
``theria_jax.tasks`` re-exports the same names with ``as_jax``. The same seed gives the same
numbers in both frameworks.
"""

from __future__ import annotations

import numpy as np
import torch

from theria_kernels._tasks import (
    TASK_FAMILIES,
    InContextRegression,
    SequenceClassification,
    Sinusoid,
    TaskBatch,
    make_family,
    sample_meta_batch,
    tasks_per_device,
)

__all__ = ["TASK_FAMILIES", "InContextRegression", "SequenceClassification", "Sinusoid", "TaskBatch",
           "make_family", "sample_meta_batch", "tasks_per_device", "as_torch"]


def as_torch(batch: TaskBatch, *, dtype, device=None) -> TaskBatch:
    """The batch as torch tensors: floating fields in ``dtype``, integer labels as int64."""
    def convert(array: np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else torch.int64)

    return TaskBatch(*(convert(field) for field in batch))
