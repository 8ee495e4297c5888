"""Seeded synthetic meta-learning tasks, in numpy: the one implementation behind
``theria_torch.tasks`` and ``theria_jax.tasks``, which re-export it and add only the conversion to
their arrays (``as_torch``, ``as_jax``). It imports neither torch nor JAX, so each adapter takes it
without the other framework; the same seed gives the same numbers in both.

Every family turns a sequence into a prediction at its **last** position, so one model and two
losses serve all of them:

* :class:`SequenceClassification` — which of ``n_classes`` signature tokens (drawn per task, so
  labels mean something different in each task) is planted in a random token sequence;
  one-hot tokens, cross-entropy.
* :class:`Sinusoid` — Finn et al. (2017): ``y = A sin(x - φ)``, ``A ~ U[0.1, 5]``,
  ``φ ~ U[0, π]``, ``x ~ U[-5, 5]``; each point is a length-1 sequence, mean squared error.
  Attention is trivial at length 1; this is the classic MAML sanity check.
* :class:`InContextRegression` — a sequence of ``(x_j, w·x_j + noise)`` pairs then a query
  ``(x_q, 0)``; the target is ``w·x_q``. Each sequence has its own ``w = w̄ + σ ε`` around a
  per-task mean ``w̄``: attention reads the sequence's ``w`` out of the context, MAML adapts
  the prior ``w̄``.

A task family is a frozen dataclass with ``d_in``, ``d_out``, ``seq_len`` and ``loss``
(``"cross_entropy"`` or ``"mse"``) plus ``sample_task(rng)`` and ``sample(rng, task, n)``.

:func:`tasks_per_device` is the one check of how a meta-batch splits over devices, shared by both
adapters' MAML functions so that they refuse the same batches with the same words.
"""

from __future__ import annotations


import dataclasses
from typing import NamedTuple

import numpy as np


class TaskBatch(NamedTuple):
    """Support and query sets of a meta-batch (a JAX pytree as well).

    Shapes (leading ``n_tasks`` axis; ``k`` = examples per set):
        support_x, query_x: (n_tasks, k, seq_len, d_in) float.
        support_y, query_y: (n_tasks, k) int64 class labels or float regression targets.
    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray

    def task(self, i: int) -> TaskBatch:
        """The ``i``-th task's sets, without the task axis: (k, seq_len, d_in) and (k,)."""
        return TaskBatch(*(field[i] for field in self))


@dataclasses.dataclass(frozen=True)
class SequenceClassification:
    """Tell which of the task's signature tokens was planted ``n_signal`` times in the sequence."""

    vocab_size: int = 16
    seq_len: int = 12
    n_classes: int = 4
    n_signal: int = 3
    loss = "cross_entropy"

    def __post_init__(self):
        if self.n_classes >= self.vocab_size:
            raise ValueError(f"n_classes ({self.n_classes}) must be below vocab_size ({self.vocab_size})")
        if not 0 < self.n_signal <= self.seq_len:
            raise ValueError(f"n_signal ({self.n_signal}) must be in [1, seq_len={self.seq_len}]")

    @property
    def d_in(self) -> int:
        return self.vocab_size

    @property
    def d_out(self) -> int:
        return self.n_classes

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        """The signature token of each class: (n_classes,) distinct token ids."""
        return rng.choice(self.vocab_size, size=self.n_classes, replace=False)

    def sample(self, rng: np.random.Generator, task: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences with balanced labels: one-hot (n, seq_len, vocab_size), labels (n,)."""
        labels = rng.permutation(np.arange(n) % self.n_classes)
        # Background tokens avoid every signature so that exactly one class is present.
        background = np.setdiff1d(np.arange(self.vocab_size), task)
        tokens = rng.choice(background, size=(n, self.seq_len))
        positions = np.argsort(rng.random((n, self.seq_len)), axis=1)[:, : self.n_signal]
        np.put_along_axis(tokens, positions, task[labels][:, None], axis=1)
        return np.eye(self.vocab_size)[tokens], labels.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Sinusoid:
    """Finn et al. (2017) sinusoid regression, one scalar point per length-1 sequence."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, np.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    loss = "mse"
    d_in = 1
    d_out = 1
    seq_len = 1

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        """(amplitude, phase) as a (2,) array."""
        return np.array([rng.uniform(*self.amplitude), rng.uniform(*self.phase)])

    def sample(self, rng: np.random.Generator, task: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (n, 1, 1) and targets (n,)."""
        x = rng.uniform(*self.x_range, size=n)
        return x[:, None, None], task[0] * np.sin(x - task[1])


@dataclasses.dataclass(frozen=True)
class InContextRegression:
    """Linear regression read from the context: ``n_context`` pairs, then the query."""

    dim: int = 4
    n_context: int = 11
    prior_std: float = 1.0
    sequence_std: float = 0.5
    noise_std: float = 0.1
    loss = "mse"
    d_out = 1

    @property
    def d_in(self) -> int:
        return self.dim + 1

    @property
    def seq_len(self) -> int:
        return self.n_context + 1

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        """The task's mean weight vector w̄: (dim,)."""
        return self.prior_std * rng.standard_normal(self.dim)

    def sample(self, rng: np.random.Generator, task: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (n, n_context + 1, dim + 1) = [x, y] with y = 0 at the query; targets (n,)."""
        w = task + self.sequence_std * rng.standard_normal((n, self.dim))
        x = rng.standard_normal((n, self.seq_len, self.dim)) / np.sqrt(self.dim)
        y = np.einsum("ntd,nd->nt", x, w)
        observed = y + self.noise_std * rng.standard_normal(y.shape)
        observed[:, -1] = 0.0
        return np.concatenate([x, observed[..., None]], axis=-1), y[:, -1]


TASK_FAMILIES = {
    "sequence_classification": SequenceClassification,
    "sinusoid": Sinusoid,
    "in_context_regression": InContextRegression,
}


def make_family(name: str, **options):
    """A task family by name (the keys of ``TASK_FAMILIES``) with its dataclass options."""
    if name not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose one of {sorted(TASK_FAMILIES)}")
    return TASK_FAMILIES[name](**options)


def sample_meta_batch(family, rng: np.random.Generator, n_tasks: int, k_support: int,
                      k_query: int) -> TaskBatch:
    """``n_tasks`` fresh tasks, each with ``k_support`` support and ``k_query`` query examples.

    Returns:
        A :class:`TaskBatch` of float64 inputs (and int64 labels or float64 targets).
    """
    fields = []
    for _ in range(n_tasks):
        task = family.sample_task(rng)
        support = family.sample(rng, task, k_support)
        query = family.sample(rng, task, k_query)
        fields.append((*support, *query))
    # (support_x, support_y, query_x, query_y) with the task axis in front.
    return TaskBatch(*(np.stack(column) for column in zip(*fields)))


def tasks_per_device(n_tasks: int, n_devices: int, *, devices: str) -> int:
    """The number of tasks each device adapts when a meta-batch is split over ``n_devices``.

    Every device must get the same number: the meta-gradient is the mean of the devices' means,
    which is the mean over the whole batch only for equal shares (and JAX's ``shard_map`` splits
    an axis into equal blocks only).

    Arguments:
        n_tasks: the global meta-batch size (the task axis of ``tasks``).
        n_devices: the size of the device group or mesh.
        devices: the argument that holds the devices ("group", "mesh"), for the message.
    Returns:
        ``n_tasks // n_devices``.
    Raises:
        ValueError: ``n_tasks`` is not a positive multiple of ``n_devices``; the message says how
            to fix it.
    """
    if n_devices < 1:
        raise ValueError(f"{devices}: needs at least one device, got {n_devices}")
    if n_tasks < n_devices or n_tasks % n_devices:
        multiple = n_devices * max(1, -(-n_tasks // n_devices))
        raise ValueError(
            f"tasks: a meta-batch of {n_tasks} tasks does not split evenly over the {n_devices} devices of "
            f"`{devices}`; every device adapts the same number of tasks, so use a meta-batch that is a "
            f"multiple of {n_devices} (e.g. {multiple}) or a `{devices}` whose size divides {n_tasks}")
    return n_tasks // n_devices
