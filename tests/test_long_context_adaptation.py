"""experiments/long_context_adaptation: the key-value retrieval tasks, torch against JAX on one fused
meta-gradient in float64, and the --quick preset end to end.

The experiment trains through theria's MAML functions on the fused backend ("triton_full_fused",
here in Triton's interpreter); these tests check that the tasks are what the protocol says (the
label is only in which value the task key carries, never in the token counts; held-out tasks use
keys training never shows, from their own stream), that the two frameworks compute the same
second-order meta-gradient, and that the quick preset runs, starts at chance and resumes.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from _device import DEVICE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ is scripts, not an installed package

from experiments.long_context_adaptation import protocol as P  # noqa: E402
from experiments.long_context_adaptation import run as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_key_value_tasks():
    family = P.KeyValueRetrieval(seq_len=200, n_classes=3, n_keys=8, held_out_keys=3, n_background=4,
                                 pair_every=64, split="train")
    rng = np.random.default_rng(0)
    task = family.sample_task(rng)
    tokens, labels = family.sample(rng, task, 9)
    assert tokens.shape == (9, 200) and np.bincount(labels).tolist() == [3, 3, 3]
    assert (tokens[:, -1] == family.readout).all() and family.copies == 3
    table = family.input_table()
    inputs = table[tokens]  # (9, 200, vocab)
    values = inputs[..., family.value_token(np.arange(3))]
    keys = inputs[..., family.key_token(np.arange(8))]
    # The counts carry no label: every sequence holds every value `copies` times, the task key
    # `copies` times, and only keys of the training pool.
    np.testing.assert_array_equal(values.sum(1), 3)
    np.testing.assert_array_equal(keys[..., task].sum(1), 3)
    assert keys[..., family.pool.max() + 1:].sum() == 0
    for row, label in zip(inputs, labels):
        pairs = row[row[:, family.n_background:family.n_background + 8].sum(1) == 1]
        assert len(pairs) == 9 and (pairs.sum(1) == 2).all()  # pair positions are two-hot
        # The task key always carries the label's value; each group's keys are distinct.
        with_task_key = pairs[pairs[:, family.key_token(task)] == 1]
        assert (with_task_key[:, family.value_token(label)] == 1).all()
        # The pairs carry no label either: the sequence holds 3 distinct (key, value) pairs, 3 times
        # each, so the task key is in every group and so is each distractor.
        kinds, counts = np.unique(pairs, axis=0, return_counts=True)
        assert len(kinds) == 3 and (counts == 3).all()
        assert len(np.unique(kinds[:, family.n_background:family.n_background + 8].argmax(1))) == 3
    assert (family.input_table()[:family.vocab_size] == np.eye(family.vocab_size)).all()
    held_out = dataclasses.replace(family, split="held_out")
    assert set(held_out.pool).isdisjoint(family.pool) and len(held_out.pool) == 3
    preset = P.PRESETS["quick"]
    held_out_tasks, train = P.held_out_tasks(preset), P.train_batch(preset, 0, 0)
    assert held_out_tasks.support_x.shape == (preset.eval_tasks, preset.k_support, preset.seq_len)
    family = preset.family()
    pair_ids = np.concatenate([train.support_x, train.query_x], axis=None)
    train_keys = (pair_ids[pair_ids >= family.vocab_size] - family.vocab_size) // family.n_classes
    assert set(train_keys).issubset(family.pool)  # training never shows a held-out key
    np.testing.assert_array_equal(P.train_batch(preset, 0, 3).query_x, P.train_batch(preset, 0, 3).query_x)


def test_key_codes():
    """With ``key_dim`` the sequences are the same token ids; only a key's input changes, from a
    one-hot column to its code: unit vectors, one table for both splits, each pair its key's code
    plus its value's one-hot entry."""
    one_hot = P.KeyValueRetrieval(seq_len=200, n_classes=3, n_keys=8, held_out_keys=3, n_background=4,
                                  pair_every=64)
    coded = dataclasses.replace(one_hot, key_dim=5)
    tokens, labels = coded.sample(np.random.default_rng(1), 2, 4)
    same_tokens, same_labels = one_hot.sample(np.random.default_rng(1), 2, 4)
    np.testing.assert_array_equal(tokens, same_tokens)
    np.testing.assert_array_equal(labels, same_labels)
    codes, table = coded.key_codes(), coded.input_table()
    assert table.shape == (coded.vocab_size + 8 * 3, 4 + 5 + 3 + 1) and coded.d_in == table.shape[1]
    np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0)
    np.testing.assert_array_equal(codes, dataclasses.replace(coded, split="held_out").key_codes())
    key, value = 6, 2  # a held-out key
    pair = table[coded.vocab_size + key * 3 + value]
    np.testing.assert_array_equal(pair[4:9], codes[key])
    assert pair[9 + value] == 1 and pair[:4].sum() == 0 and pair[9:].sum() == 1
    # Background, value and readout tokens keep their one-hot inputs.
    for token in (0, 3, coded.value_token(1), coded.readout):
        np.testing.assert_array_equal(np.delete(table[token], range(4, 9)),
                                      np.delete(one_hot.input_table()[token], range(4, 12)))


def test_torch_and_jax_fused_meta_gradients_agree_in_float64(device):
    import jax

    jax.config.update("jax_enable_x64", True)
    # The quick preset: one task of 3 + 3 sequences of 16 tokens (the interpreter's time is per
    # launch and per program; one task already exercises every second-order path).
    preset = dataclasses.replace(P.PRESETS["quick"], dtype="float64", device=device)
    grads = {}
    for framework in ("torch", "jax"):
        # A non-zero head, so that the second-order term reaches every parameter.
        params = P.initial_params(preset, 0)
        params["head.weight"] = np.random.default_rng(1).standard_normal(params["head.weight"].shape)
        learner = R.make_learner(preset, framework, "maml", 0, params=params)
        batch = R.to_device(learner, P.train_batch(preset, 0, 0), preset.family())
        g, loss = learner.meta_gradient(batch)
        grads[framework] = (learner.numpy(g), float(loss))
    (g_t, loss_t), (g_j, loss_j) = grads["torch"], grads["jax"]
    np.testing.assert_allclose(loss_t, loss_j, rtol=1e-10)
    for name in g_t:
        error = np.linalg.norm(g_t[name] - g_j[name]) / np.linalg.norm(g_j[name])
        worst = np.abs(g_t[name] - g_j[name]).max()
        assert error <= 1e-9, f"{name}: relative error {error:.2e} (max abs diff {worst:.2e})"


def test_quick_preset_runs(tmp_path):
    # On DEVICE: the quick preset's CPU tensors need the interpreter, which a GPU machine's test
    # process does not run (tests/_device.py).
    command = ["--quick", "--frameworks", "torch", "--methods", "maml", "pretrained", "--set", "meta_steps=2",
               "--set", f"device={DEVICE}", "--out", str(tmp_path)]
    assert R.main(command) == 0
    runs = {run["method"]: run for run in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert sorted(runs) == ["maml", "pretrained"]
    chance = math.log(P.PRESETS["quick"].n_classes)
    # The zero head: the pretrained model's first loss (no inner step) is exactly chance.
    assert abs(runs["pretrained"]["train_losses"][0] - chance) < 1e-6
    for run in runs.values():
        assert all(np.isfinite(run["train_losses"])) and len(run["train_losses"]) == 2
        assert set(run["held_out"]) == {"0", "1"}
        np.testing.assert_allclose(np.mean(run["held_out"]["0"]["loss"]), chance, atol=0.05)
    # Resumable: the same command again finds every run done and trains nothing.
    assert R.main(command) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "table.md").exists() and (tmp_path / "curves.png").exists()
