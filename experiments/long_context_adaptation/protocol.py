"""The long-context adaptation protocol: the task family, the model, the presets and the seeds.

Task (:class:`KeyValueRetrieval`): a sequence of ``seq_len`` positions is background (tokens
drawn from ``n_background`` filler tokens) with ``n_classes * copies`` *pair* positions scattered
anywhere before the last, and a fixed readout token at the last position, where the label is
predicted. A pair position carries two tokens at once, a key and a value (its input is the sum of
the two tokens' input vectors, so the network sees them added, never as one joint symbol). Each task
draws one *task key* out of ``n_keys``; each sequence draws ``n_classes - 1`` distinct
*distractor* keys and pairs every one of the ``n_classes`` value tokens with one key: the label's
value with the task key, every other value with its own distractor. The sequence holds those same
``n_classes`` pairs ``copies`` times, in groups. The label is which value the task key carries.

What that makes a model do:
- Every sequence holds every value equally often, and every key it holds (the task key among
  them) equally often, so the histogram of tokens says nothing about the label: a uniform (or any
  content-blind) average over the sequence, which is what a random network's attention gives,
  carries no label at all, and neither does anything linear in it. The pairs are symmetric too:
  each of the sequence's ``n_classes`` (key, value) pairs appears ``copies`` times, so nothing in
  the sequence tells the task key from a distractor. Only attention that singles out the pair
  positions whose *key* is the task key, and reads their *value*, solves it; that is a
  content-based retrieval over all ``seq_len`` positions.
- The distractors stay the same across a sequence's groups for that symmetry. Drawn afresh per
  group (this protocol's first version), at ``copies`` > 1 the task key was the one key in every
  group and its pair the one repeated pair, a frequency signal a joint model reads by weighting
  each training key differently: at T = 8192 (32 groups) the pretrained model reached a
  training-task loss of 0.83 with no support set (chance 1.386), MAML learned the same shortcut,
  and neither transferred to held-out keys. At ``copies`` = 1 both versions draw the same sequences.
- The part shared by every task (attend to pair positions, not to the background; read the
  value out to the class) can be learned into the initial weights. The part that changes per
  task (which key to retrieve) must be adapted from the support set, and it lives in the
  attention: the readout position's query has to move toward the task key. That is what the inner
  step adapts.
- Without the support set no model beats chance (ln n_classes): the joint (pretrained) model
  can learn the shared part, but not which key.
- Held-out tasks are new tasks, not new draws of the training tasks: the key vocabulary is split,
  training tasks take their task key and their distractors from the first ``n_keys -
  held_out_keys`` keys, held-out tasks from the last ``held_out_keys``, so a held-out key token
  was never seen in training at all (one-hot: its embedding column is the initial one; as a code,
  see below). What meta-learning can carry over is a mechanism (find the key the support set
  points to, read its value), not a table of the training keys. (The pools must be disjoint:
  with distractors drawn from every key in training, a key never seen as a task key is never the
  answer, and a joint model learns that, beating chance on training tasks and scoring far below
  it on held-out ones.) They come from their own seed stream.

``copies = max(1, seq_len // pair_every)`` keeps the fraction of pair positions fixed as the
context grows.

Key codes (``key_dim`` > 0): each key's input is then a fixed random unit vector of ``key_dim``
entries instead of a one-hot column, the same table for both splits. With one-hot keys a held-out
key's embedding column is the initial one while training has moved every training key's, so the
network meets held-out keys off the distribution it was trained on; with codes a held-out key is
one more draw from the distribution every training key came from, and the network has no
parameter that belongs to one key. (With one-hot keys MAML's transfer was real but miscalibrated,
its held-out accuracy well above chance and its loss above chance too: docs/results/
long_context_adaptation.md.)

Token ids (int16): ids below ``vocab_size`` are single tokens (background, keys, values, readout,
in that order); the id ``vocab_size + key * n_classes + value`` is a pair.
:meth:`KeyValueRetrieval.input_table` maps ids to input vectors (one-hot, two-hot for pairs, a key
code in place of the key's one-hot entry with ``key_dim``); the
run builds the inputs on the device from it (at T = 8192 a float32 meta-batch of inputs is 60 MB,
and building it on the host took as long as the meta-step).

Model: the MAML experiments' pre-norm transformer (``theria_kernels._models``) with its head
weight set to zero, so every method starts at exactly chance (ln n_classes), and the logits stay
at zero until training has put something in the head.

Methods: ``maml`` (second order through the inner steps), ``fo_maml`` (inner gradients detached),
``pretrained`` (joint training on the query sets with no inner step, i.e. MAML with zero inner
steps; at test time it is fine-tuned with the same inner steps and learning rate as the others),
``untrained`` (the initial weights, not trained at all, adapted like the others: what the random
network's features allow on their own).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from theria_kernels._models import ModelConfig, init_params
from theria_kernels._tasks import TaskBatch, sample_meta_batch

METHODS = ("maml", "fo_maml", "pretrained", "untrained")
# Held-out tasks come from their own seed stream (training batches use [seed, 1, step]), the
# same for every seed, method and framework.
HELD_OUT_SEED = [2026, 12, 1]
KEY_CODE_SEED = [2026, 12, 2]  # the key codes' stream (``key_dim`` > 0), one table for every run


@dataclasses.dataclass(frozen=True)
class KeyValueRetrieval:
    """Which value the task key carries (module docstring). ``split`` picks the key pool (task
    key and distractors): "train" the first ``n_keys - held_out_keys`` keys, "held_out" the rest.
    ``sample`` returns token ids, not input vectors."""

    seq_len: int
    n_classes: int = 4
    n_keys: int = 24
    held_out_keys: int = 8
    n_background: int = 8
    pair_every: int = 256
    split: str = "train"
    key_dim: int = 0  # > 0: keys as fixed random unit vectors of this size (module docstring)
    loss = "cross_entropy"

    def __post_init__(self):
        if self.split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {self.split!r}")
        if min(self.held_out_keys, self.n_keys - self.held_out_keys) < self.n_classes:
            raise ValueError("each key pool (held_out_keys, n_keys - held_out_keys) needs at least n_classes keys")
        if self.n_classes * self.copies >= self.seq_len:
            raise ValueError(f"{self.n_classes * self.copies} pair positions do not fit before the readout "
                             f"of a sequence of {self.seq_len}")

    @property
    def copies(self) -> int:
        return max(1, self.seq_len // self.pair_every)

    @property
    def vocab_size(self) -> int:
        return self.n_background + self.n_keys + self.n_classes + 1

    @property
    def readout(self) -> int:
        return self.vocab_size - 1

    @property
    def d_in(self) -> int:
        return self.n_background + (self.key_dim or self.n_keys) + self.n_classes + 1

    @property
    def d_out(self) -> int:
        return self.n_classes

    def key_token(self, key) -> np.ndarray:
        return self.n_background + np.asarray(key)

    def value_token(self, value) -> np.ndarray:
        return self.n_background + self.n_keys + np.asarray(value)

    def key_codes(self) -> np.ndarray:
        """(n_keys, key_dim): each key's code, unit vectors from a fixed stream (both splits)."""
        codes = np.random.default_rng(KEY_CODE_SEED).standard_normal((self.n_keys, self.key_dim))
        return codes / np.linalg.norm(codes, axis=1, keepdims=True)

    def input_table(self) -> np.ndarray:
        """(vocab_size + n_keys * n_classes, d_in): row ``id`` is that id's input vector."""
        singles = np.eye(self.vocab_size)
        if self.key_dim:  # the key block of one-hot columns becomes a block of key_dim code entries
            keys = slice(self.n_background, self.n_background + self.n_keys)
            singles = np.concatenate([singles[:, :keys.start], singles[:, keys] @ self.key_codes(),
                                      singles[:, keys.stop:]], axis=1)
        keys, values = np.divmod(np.arange(self.n_keys * self.n_classes), self.n_classes)
        pairs = singles[self.key_token(keys)] + singles[self.value_token(values)]
        return np.concatenate([singles, pairs])

    @property
    def pool(self) -> np.ndarray:
        """The keys of this split's tasks and distractors."""
        trained = self.n_keys - self.held_out_keys
        return np.arange(trained) if self.split == "train" else np.arange(trained, self.n_keys)

    def sample_task(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.pool))

    def sample(self, rng: np.random.Generator, task: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences with balanced labels: token ids (n, seq_len) int16, labels (n,) int64."""
        c, copies = self.n_classes, self.copies
        labels = rng.permutation(np.arange(n) % c)
        tokens = rng.integers(self.n_background, size=(n, self.seq_len)).astype(np.int16)
        # Per sequence: distinct distractor keys (any of the pool's but the task's) for the other
        # values, the same in every group (the module docstring says why).
        others = self.pool[self.pool != task]
        distractors = others[np.argsort(rng.random((n, 1, len(others))), axis=-1)[..., :c - 1]]
        is_label = np.broadcast_to(np.arange(c) == labels[:, None, None], (n, copies, c))
        keys = np.full((n, copies, c), task)  # (sequence, group, value) -> key
        # Row-major: each group's c - 1 other values in order, from the sequence's distractors.
        keys[~is_label] = np.broadcast_to(distractors, (n, copies, c - 1)).reshape(-1)
        pairs = self.vocab_size + keys * c + np.arange(c)
        # n_classes * copies distinct positions per row, anywhere before the readout (O(T)).
        positions = np.argpartition(rng.random((n, self.seq_len - 1)), c * copies, axis=1)[:, :c * copies]
        np.put_along_axis(tokens, positions, pairs.reshape(n, -1).astype(np.int16), axis=1)
        tokens[:, -1] = self.readout
        return tokens, labels.astype(np.int64)


def encode(batch: TaskBatch, family: KeyValueRetrieval) -> TaskBatch:
    """A batch of token ids as float64 input vectors (numpy; what the tests and small runs use)."""
    table = family.input_table()
    return batch._replace(support_x=table[batch.support_x], query_x=table[batch.query_x])


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that defines a run besides (framework, method, seed)."""

    name: str
    seq_len: int
    n_classes: int = 4
    n_keys: int = 24
    held_out_keys: int = 8
    n_background: int = 8
    pair_every: int = 256  # one group of n_classes pairs per this many positions
    key_dim: int = 0  # > 0: keys as random codes of this size (KeyValueRetrieval), else one-hot
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    inner_lr: float = 1.0
    inner_steps: int = 1
    meta_batch: int = 4
    k_support: int = 8
    k_query: int = 8
    meta_steps: int = 600
    outer_lr: float = 3e-3
    eval_tasks: int = 32
    eval_chunk: int = 4  # held-out tasks adapted at once (bounds memory at long T)
    eval_steps: tuple[int, ...] = (0, 1, 3)
    dtype: str = "bfloat16"
    tf32: bool = False  # float32 products as TF32 on the GPU (torch's allow_tf32, JAX's "tensorfloat32")
    device: str = "cuda"
    backend: str = "triton_full_fused"
    threads: int | None = None

    def family(self, split: str = "train") -> KeyValueRetrieval:
        return KeyValueRetrieval(seq_len=self.seq_len, n_classes=self.n_classes, n_keys=self.n_keys,
                                 held_out_keys=self.held_out_keys, n_background=self.n_background,
                                 pair_every=self.pair_every, split=split, key_dim=self.key_dim)

    def model(self) -> ModelConfig:
        return ModelConfig(d_in=self.family().d_in, d_out=self.n_classes, max_len=self.seq_len,
                           d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers, causal=True)

    def key(self) -> dict:
        """The fields that make two runs comparable (everything but the framework, method, seed),
        as they read back from JSON (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS = {
    # The GPU experiment: T = 8192 on the fused kernels (the math reference OOMs here), float32
    # like the CPU study (bf16 parameters under Adam drifted in the needle runs), with TF32
    # products: IEEE float32 ones cost 0.70 s per torch MAML step on the H200, 7x the bf16 step.
    # Keys as codes, 64 of them in training (held-out keys one more draw of the same distribution).
    # One group per 32 positions: the pair density (1 in 8) of the CPU study that learned (T = 256,
    # eight groups); at one group per 256 (1 in 64) T = 256 stayed near chance on the CPU.
    "gpu": Preset(name="gpu", seq_len=8192, n_keys=72, key_dim=16, pair_every=32, dtype="float32", tf32=True),
    # A look on the CPU under Triton's interpreter: tiny T and model, a few meta-steps.
    "quick": Preset(name="quick", seq_len=16, n_classes=3, n_keys=6, held_out_keys=3, n_background=3,
                    pair_every=16, key_dim=4, d_model=16, n_heads=2, meta_batch=1, k_support=3, k_query=3,
                    meta_steps=3, eval_tasks=2, eval_chunk=2, eval_steps=(0, 1), dtype="float32", device="cpu",
                    threads=1),
    # The regime study on the CPU: small T on the reference backend (plain attention, the same
    # numbers as the fused kernels to rounding), float32, where many runs are affordable.
    "cpu": Preset(name="cpu", seq_len=128, d_model=32, n_heads=2, meta_steps=400, eval_tasks=64,
                  eval_chunk=16, dtype="float32", device="cpu", backend="reference", threads=1),
}


def initial_params(preset: Preset, seed: int) -> dict[str, np.ndarray]:
    """``init_params`` with a zero head weight: logits 0, loss ln n_classes at step 0."""
    params = init_params(preset.model(), seed)
    params["head.weight"] = np.zeros_like(params["head.weight"])
    return params


def train_batch(preset: Preset, seed: int, step: int) -> TaskBatch:
    """The meta-batch of training step ``step`` (token ids), seeded by (seed, step)."""
    return sample_meta_batch(preset.family("train"), np.random.default_rng([seed, 1, step]), preset.meta_batch,
                             preset.k_support, preset.k_query)


def held_out_tasks(preset: Preset) -> TaskBatch:
    """``eval_tasks`` tasks on keys never a task key in training (their own seed stream), K
    support and ``k_query`` query sequences each."""
    return sample_meta_batch(preset.family("held_out"), np.random.default_rng(HELD_OUT_SEED), preset.eval_tasks,
                             preset.k_support, preset.k_query)
