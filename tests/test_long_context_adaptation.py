"""experiments/long_context_adaptation: the needle tasks, torch against JAX on one fused meta-gradient
in float64, and the --quick preset end to end.

The experiment trains through theria's MAML functions on the fused backend ("triton_full_fused",
here in Triton's interpreter); these tests check that the tasks are what the protocol says (the
label is only in the task's needles, the readout token closes every sequence, held-out tasks come
from their own stream), that the two frameworks compute the same second-order meta-gradient, and
that the quick preset runs, starts at chance and resumes.
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


def test_needle_tasks():
    family = P.NeedleClassification(vocab_size=12, seq_len=64, n_classes=3, n_signal=4)
    rng = np.random.default_rng(0)
    task = family.sample_task(rng)
    tokens, labels = family.sample(rng, task, 9)
    assert tokens.shape == (9, 64) and np.bincount(labels).tolist() == [3, 3, 3]
    assert (tokens[:, -1] == family.readout).all() and family.readout not in task
    for row, label in zip(tokens, labels):
        # Exactly the label's needle, n_signal times, and no other needle.
        assert (row == task[label]).sum() == 4
        assert not np.isin(row, np.delete(task, label)).any()
    preset = P.PRESETS["quick"]
    held_out, train = P.held_out_tasks(preset), P.train_batch(preset, 0, 0)
    assert held_out.support_x.shape == (preset.eval_tasks, preset.k_support, preset.seq_len)
    assert not np.array_equal(held_out.support_x[: preset.meta_batch], train.support_x)
    np.testing.assert_array_equal(P.train_batch(preset, 0, 3).query_x, P.train_batch(preset, 0, 3).query_x)


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
        batch = R.to_device(learner, P.train_batch(preset, 0, 0), preset.vocab_size)
        g, loss = learner.meta_gradient(batch)
        grads[framework] = (learner.numpy(g), float(loss))
    (g_t, loss_t), (g_j, loss_j) = grads["torch"], grads["jax"]
    np.testing.assert_allclose(loss_t, loss_j, rtol=1e-10)
    for name in g_t:
        error = np.linalg.norm(g_t[name] - g_j[name]) / np.linalg.norm(g_j[name])
        assert error <= 1e-9, f"{name}: relative error {error:.2e} (max abs diff {np.abs(g_t[name] - g_j[name]).max():.2e})"


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
