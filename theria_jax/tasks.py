"""The seeded task samplers of ``theria_kernels._tasks`` (one numpy implementation), as JAX arrays.

Only the conversion lives here; ``theria_kernels._tasks`` documents the task families, and
``theria_torch.tasks`` re-exports the same names with ``as_torch``. The same seed gives the same
numbers in both frameworks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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
           "make_family", "sample_meta_batch", "tasks_per_device", "as_jax"]


def as_jax(batch: TaskBatch, *, dtype) -> TaskBatch:
    """The batch as JAX arrays: floating fields in ``dtype``, integer labels as int32.

    ``dtype=jnp.float64`` needs ``jax.config.update("jax_enable_x64", True)``.
    """
    def convert(array: np.ndarray):
        return jnp.asarray(array, dtype=dtype if np.issubdtype(array.dtype, np.floating) else jnp.int32)

    return TaskBatch(*(convert(field) for field in batch))
