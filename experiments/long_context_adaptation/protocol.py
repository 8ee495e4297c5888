"""The long-context adaptation protocol: the task family, the model, the presets and the seeds.

Task (:class:`NeedleClassification`): every task draws ``n_classes`` needle tokens out of the
vocabulary; a sequence of ``seq_len`` tokens is background (tokens that are none of the task's
needles) with one class's needle planted at ``n_signal`` random positions anywhere before the
last, and a fixed readout token at the last position, where the label is predicted: which needle
was planted. The needles, and which label each means, change from task to task, so a model that
has not seen the task's support set cannot do better than chance (ln n_classes), whatever it was
trained on; the evidence is spread over the whole sequence, so the readout position must gather
it through attention over all ``seq_len`` tokens, and what it must look for is what the support
set teaches. ``n_signal = seq_len // signal_every`` keeps the fraction of evidence fixed as the
context grows. (The readout token keeps the last position's own embedding, which carries nothing
about the label, out of the features; with a random token there, as in
``theria_kernels._tasks.SequenceClassification``, training sat at chance for most of a 300-step
run at T = 8192.)

Model: the MAML experiments' pre-norm transformer (``theria_kernels._models``) with its head
weight set to zero, so every method starts at exactly chance (ln n_classes), and the logits stay
at zero until training has put something in the head.

Methods: ``maml`` (second order through the inner steps), ``fo_maml`` (inner gradients detached),
``pretrained`` (joint training on the query sets with no inner step, i.e. MAML with zero inner
steps; at test time it is fine-tuned with the same inner steps and learning rate as the others),
``untrained`` (the initial weights, not trained at all, adapted like the others: what the random
network's features allow on their own).

Batches are drawn as token ids (:class:`TokenBatch`); the run turns them into one-hot inputs on
the device (at T = 8192 a one-hot meta-batch is 67 MB in float32, and drawing it on the host took
as long as the meta-step).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from theria_kernels._models import ModelConfig, init_params
from theria_kernels._tasks import SequenceClassification, TaskBatch, sample_meta_batch

METHODS = ("maml", "fo_maml", "pretrained", "untrained")
# Held-out tasks come from their own seed stream (training batches use [seed, 1, step]), the
# same for every seed, method and framework.
HELD_OUT_SEED = [2026, 12, 1]


@dataclasses.dataclass(frozen=True)
class NeedleClassification(SequenceClassification):
    """Which of the task's needle tokens is planted ``n_signal`` times; the last token is the
    readout token ``vocab_size - 1``. ``sample`` returns token ids, not one-hot vectors."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_classes >= self.vocab_size - 1 or self.n_signal >= self.seq_len:
            raise ValueError("needs n_classes < vocab_size - 1 (one token is the readout) and "
                             "n_signal < seq_len")

    @property
    def readout(self) -> int:
        return self.vocab_size - 1

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.readout, size=self.n_classes, replace=False)

    def sample(self, rng: np.random.Generator, task: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences with balanced labels: token ids (n, seq_len) int8, labels (n,) int64."""
        labels = rng.permutation(np.arange(n) % self.n_classes)
        background = np.setdiff1d(np.arange(self.readout), task)
        tokens = rng.choice(background, size=(n, self.seq_len)).astype(np.int8)
        # n_signal distinct positions per row, anywhere before the readout (argpartition: O(T)).
        positions = np.argpartition(rng.random((n, self.seq_len - 1)), self.n_signal, axis=1)[:, :self.n_signal]
        np.put_along_axis(tokens, positions, task[labels][:, None].astype(np.int8), axis=1)
        tokens[:, -1] = self.readout
        return tokens, labels.astype(np.int64)


def one_hot(batch: TaskBatch, vocab_size: int) -> TaskBatch:
    """A batch of token ids as one-hot float64 inputs (numpy; what the tests and small runs use)."""
    eye = np.eye(vocab_size)
    return batch._replace(support_x=eye[batch.support_x], query_x=eye[batch.query_x])


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that defines a run besides (framework, method, seed)."""

    name: str
    seq_len: int
    vocab_size: int = 32
    n_classes: int = 4
    signal_every: int = 16  # one needle per this many tokens
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    inner_lr: float = 0.5
    inner_steps: int = 1
    meta_batch: int = 4
    k_support: int = 8
    k_query: int = 8
    meta_steps: int = 300
    outer_lr: float = 5e-3
    eval_tasks: int = 32
    eval_chunk: int = 4  # held-out tasks adapted at once (bounds memory at long T)
    eval_steps: tuple[int, ...] = (0, 1, 5)
    dtype: str = "bfloat16"
    device: str = "cuda"
    backend: str = "triton_full_fused"
    threads: int | None = None

    @property
    def n_signal(self) -> int:
        return max(1, self.seq_len // self.signal_every)

    def family(self) -> NeedleClassification:
        return NeedleClassification(vocab_size=self.vocab_size, seq_len=self.seq_len,
                                    n_classes=self.n_classes, n_signal=self.n_signal)

    def model(self) -> ModelConfig:
        return ModelConfig(d_in=self.vocab_size, d_out=self.n_classes, max_len=self.seq_len,
                           d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers, causal=True)

    def key(self) -> dict:
        """The fields that make two runs comparable (everything but the framework, method, seed),
        as they read back from JSON (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS = {
    # The GPU experiment: T = 8192 on the fused kernels, bf16 (the math reference OOMs here).
    "gpu": Preset(name="gpu", seq_len=8192),
    # A look on the CPU under Triton's interpreter: tiny T and model, a few meta-steps.
    "quick": Preset(name="quick", seq_len=16, vocab_size=12, n_classes=3, signal_every=8, d_model=16,
                    n_heads=2, n_layers=1, inner_lr=1.0, meta_batch=1, k_support=3, k_query=3,
                    meta_steps=3, outer_lr=3e-3, eval_tasks=2, eval_chunk=2, eval_steps=(0, 1),
                    dtype="float32", device="cpu", threads=1),
    # The regime study on the CPU: small T on the reference backend (plain attention, the same
    # numbers as the fused kernels to rounding), float32, where many runs are affordable.
    "cpu": Preset(name="cpu", seq_len=256, d_model=32, n_heads=2, n_layers=2, meta_steps=300,
                  eval_tasks=64, eval_chunk=16, dtype="float32", device="cpu", backend="reference"),
}


def initial_params(preset: Preset, seed: int) -> dict[str, np.ndarray]:
    """``init_params`` with a zero head weight: logits 0, loss ln n_classes at step 0."""
    params = init_params(preset.model(), seed)
    params["head.weight"] = np.zeros_like(params["head.weight"])
    return params


def train_batch(preset: Preset, seed: int, step: int) -> TaskBatch:
    """The meta-batch of training step ``step`` (token ids), seeded by (seed, step)."""
    return sample_meta_batch(preset.family(), np.random.default_rng([seed, 1, step]), preset.meta_batch,
                             preset.k_support, preset.k_query)


def held_out_tasks(preset: Preset) -> TaskBatch:
    """``eval_tasks`` tasks never drawn in training (their own seed stream), K support and
    ``k_query`` query sequences each."""
    return sample_meta_batch(preset.family(), np.random.default_rng(HELD_OUT_SEED), preset.eval_tasks,
                             preset.k_support, preset.k_query)
