"""Finn, Abbeel & Levine (2017), sinusoid regression: the protocol, the task stream, the weights.

Framework-neutral (numpy only) and shared by ``train_torch`` and ``train_jax``: both frameworks
start from the same numpy weights and meet the same tasks in the same order, so their results
differ only by the framework (and float32 rounding).

Tasks follow ``theria_kernels._tasks.Sinusoid`` (``y = A sin(x - φ)``, ``A ~ U[0.1, 5]``,
``φ ~ U[0, π]``, ``x ~ U[-5, 5]``) and come as theria's :class:`TaskBatch`, inputs shaped
(n_tasks, k, seq_len=1, d_in=1). The sampler here draws a whole meta-batch with three numpy calls
instead of ``sample_meta_batch``'s loop over tasks (about 40 µs a task, which is 70 s of sampling
per 70,000-iteration run).

Seeding: the batch of meta-iteration ``i`` is a function of ``(seed, shots, i)`` alone, whatever
the chunking, the method or the framework; the held-out tasks come from a separate stream.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from theria_kernels._tasks import Sinusoid, TaskBatch

# First word of every seed, so that the streams never share a seed.
_TRAIN, _TEST, _INIT = 0, 1, 2

METHODS = ("maml", "fo_maml", "pretrained")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything a run depends on. :data:`FULL` is the paper's protocol.

    ``eval_query`` points per held-out task measure the loss after adaptation (more than the
    paper's K only lowers the variance of the same expectation). ``baseline_lrs`` are the inner
    learning rates the pretrained baseline is also fine-tuned with at evaluation (the paper's
    Fig. 3 shows it at 0.01 for K = 5 and at a tuned 0.02 for K = 10); every method is always
    evaluated at ``inner_lr``.
    """

    shots: tuple[int, ...] = (5, 10)
    hidden: tuple[int, ...] = (40, 40)
    inner_lr: float = 0.01
    train_inner_steps: int = 1
    meta_batch: int = 25
    outer_lr: float = 1e-3
    iterations: int = 70_000
    eval_tasks: int = 600
    eval_query: int = 100
    eval_steps: int = 10
    baseline_lrs: tuple[float, ...] = (0.02,)
    curve_every: int = 1_000
    chunk: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if self.iterations % self.chunk or self.curve_every % self.chunk:
            raise ValueError(f"iterations ({self.iterations}) and curve_every ({self.curve_every}) "
                             f"must be multiples of chunk ({self.chunk})")


FULL = Protocol()
# About a minute on a 2-core CPU for both frameworks: enough to see MAML pull away.
QUICK = dataclasses.replace(FULL, iterations=1_000, eval_tasks=200, curve_every=200, chunk=200)


def sample_tasks(rng: np.random.Generator, n_tasks: int, k_support: int, k_query: int,
                 family: Sinusoid = Sinusoid()) -> TaskBatch:
    """``n_tasks`` sinusoids, each with ``k_support`` support and ``k_query`` query points.

    Returns:
        A float64 :class:`TaskBatch`: inputs (n_tasks, k, 1, 1), targets (n_tasks, k).
    """
    amplitude = rng.uniform(*family.amplitude, size=(n_tasks, 1))
    phase = rng.uniform(*family.phase, size=(n_tasks, 1))
    x = rng.uniform(*family.x_range, size=(n_tasks, k_support + k_query))
    y = amplitude * np.sin(x - phase)
    x = x[..., None, None]
    return TaskBatch(x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:])


def train_batches(protocol: Protocol, shots: int, start: int, count: int) -> TaskBatch:
    """The meta-batches of iterations ``start .. start + count - 1`` (K support and K query points
    per task, as in training).

    Returns:
        A :class:`TaskBatch` with leading axes (count, meta_batch).
    """
    batches = [sample_tasks(np.random.default_rng([_TRAIN, protocol.seed, shots, i]), protocol.meta_batch,
                            shots, shots) for i in range(start, start + count)]
    return TaskBatch(*(np.stack(field) for field in zip(*batches)))


def test_tasks(protocol: Protocol, shots: int) -> TaskBatch:
    """The held-out tasks: K support points and ``eval_query`` query points each."""
    rng = np.random.default_rng([_TEST, protocol.seed, shots])
    return sample_tasks(rng, protocol.eval_tasks, shots, protocol.eval_query)


def joint_regression_tasks(tasks: TaskBatch) -> TaskBatch:
    """Tasks whose query set is support ∪ query: with zero inner steps, MAML's meta-loss on these is
    the joint regression loss of the pretrained baseline on every point it is given."""
    query_x = np.concatenate([tasks.support_x, tasks.query_x], axis=-3)
    query_y = np.concatenate([tasks.support_y, tasks.query_y], axis=-1)
    return TaskBatch(tasks.support_x, tasks.support_y, query_x, query_y)


def method_settings(protocol: Protocol, method: str) -> dict:
    """Keyword arguments of ``maml.meta_gradient`` for a method (the pretrained baseline is MAML with
    no inner step, trained on :func:`joint_regression_tasks`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    steps = 0 if method == "pretrained" else protocol.train_inner_steps
    return {"inner_lr": protocol.inner_lr, "steps": steps, "first_order": method == "fo_maml"}


def init_mlp(protocol: Protocol) -> dict[str, np.ndarray]:
    """Weights of the ReLU MLP 1-``hidden``-1, uniform in ±1/√fan_in (torch.nn.Linear's default; the
    paper does not state its initialisation).

    Returns:
        ``layer{i}.weight``: (fan_in, fan_out) and ``layer{i}.bias``: (fan_out,) float64 arrays;
        the layer maps ``h @ weight + bias``.
    """
    rng = np.random.default_rng([_INIT, protocol.seed])
    sizes = (1, *protocol.hidden, 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"layer{i}.weight"] = rng.uniform(-bound, bound, size=(fan_in, fan_out))
        params[f"layer{i}.bias"] = rng.uniform(-bound, bound, size=(fan_out,))
    return params


def summarise(losses: np.ndarray) -> dict:
    """Mean and 95 % half-width (normal approximation) of per-task losses (n_tasks,)."""
    return {"mean": float(np.mean(losses)),
            "ci95": float(1.96 * np.std(losses, ddof=1) / math.sqrt(len(losses)))}
