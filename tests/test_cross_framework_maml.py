"""torch and JAX compute the same MAML: same numpy weights and tasks, float64, agreement to 1e-10.

Also the parameter layout and the converters between the frameworks, and (GPU only) the
long-context benchmark script as one command. The torch side runs on ``DEVICE`` (tests/_device.py),
JAX on its default device (the GPU when there is one); the comparisons are in numpy on the CPU.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _device import DEVICE
import theria_jax.maml
import theria_jax.models
import theria_jax.tasks
import theria_torch.maml
import theria_torch.models
import theria_torch.tasks

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {
    "sequence_classification": dict(vocab_size=10, seq_len=6, n_classes=3, n_signal=2),
    "sinusoid": {},
    "in_context_regression": dict(dim=3, n_context=5),
}
TOL = 1e-10


# One intra-op thread: at these tiny sizes more threads only synchronise (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def flat(tree: dict) -> np.ndarray:
    """All tensors of a parameter dict in one float64 vector (sorted names), so that tensors whose
    gradient is exactly zero (attention's wq, wk on length-1 sinusoid sequences) do not divide 0/0."""
    return np.concatenate([np.asarray(tree[name], dtype=np.float64).ravel() for name in sorted(tree)])


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_torch_and_jax_meta_gradients_agree(family_name):
    family = theria_torch.tasks.make_family(family_name, **FAMILIES[family_name])
    config = theria_torch.models.ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len,
                                             d_model=16, n_heads=2, n_layers=1, causal=True)
    weights = theria_torch.models.init_params(config, 3)
    batch = theria_torch.tasks.sample_meta_batch(family, np.random.default_rng(4), 3, 4, 4)
    options = dict(inner_lr=0.3, steps=2)

    model = theria_torch.models.TransformerStack(config, dtype=torch.float64, device=DEVICE)
    torch_loss = theria_torch.models.make_loss_fn(model, family.loss)
    torch_params = theria_torch.models.torch_params(weights, dtype=torch.float64, device=DEVICE)
    torch_batch = theria_torch.tasks.as_torch(batch, dtype=torch.float64, device=DEVICE)
    torch_out = {"outputs": {"": torch.func.functional_call(model, torch_params, (torch_batch.query_x[0],))}}
    for method, first_order in (("maml", False), ("fo_maml", True)):
        torch_out[method] = theria_torch.maml.meta_gradient(torch_params, torch_batch, torch_loss,
                                                            first_order=first_order, **options)[0]

    jax_loss = theria_jax.models.make_loss_fn(config, family.loss)

    @jax.jit
    def jax_run(params, batch):
        return {"outputs": {"": theria_jax.models.apply(params, batch.query_x[0], config)},
                **{method: theria_jax.maml.meta_gradient(params, batch, jax_loss, first_order=first_order,
                                                         **options)[0]
                   for method, first_order in (("maml", False), ("fo_maml", True))}}

    jax_out = jax_run(theria_jax.models.jax_params(weights, dtype=jnp.float64),
                      theria_jax.tasks.as_jax(batch, dtype=jnp.float64))
    torch_out = {quantity: {n: v.detach().cpu().numpy() for n, v in tree.items()}
                 for quantity, tree in torch_out.items()}
    for quantity, expected in torch_out.items():
        error = relative_error(flat(jax_out[quantity]), flat(expected))
        worst = max(expected, key=lambda n: np.abs(np.asarray(jax_out[quantity][n]) - expected[n]).max())
        assert error <= TOL, (f"{family_name} {quantity}: torch vs jax relative error {error:.3e} > {TOL:g} "
                              f"(largest difference in {worst!r})")
    maml_vs_fo = relative_error(flat(torch_out["fo_maml"]), flat(torch_out["maml"]))
    assert maml_vs_fo > 1e-3, "the comparison would not tell full MAML from FO-MAML"


def test_parameter_converters_round_trip():
    config = theria_torch.models.ModelConfig(d_in=4, d_out=2, max_len=5, d_model=16, n_heads=2, n_layers=2)
    model = theria_torch.models.TransformerStack(config, seed=5, dtype=torch.float32, device=DEVICE)
    torch_params = dict(model.named_parameters())
    jax_params = theria_jax.models.from_torch(torch_params)
    assert {n: (v.shape, v.dtype) for n, v in jax_params.items()} == {
        n: (shape, jnp.float32) for n, shape in theria_torch.models.param_shapes(config).items()}
    back = theria_jax.models.to_torch(jax_params)
    for name, value in torch_params.items():
        assert torch.equal(back[name], value.detach()), name
    with torch.no_grad():  # the JAX arrays are copies: torch's in-place updates must not reach them
        next(iter(torch_params.values())).add_(1.0)
    first = next(iter(torch_params))
    assert not np.array_equal(np.asarray(jax_params[first]), torch_params[first].detach().cpu().numpy())


@pytest.mark.gpu
def test_long_context_script(tmp_path):
    """Full MAML at T=1024 (fused vs reference, same meta-gradient within dtype tolerance) and
    T=4096 (the fused backend runs): the script exits 0 and writes its table and plot."""
    done = subprocess.run([sys.executable, str(REPO / "experiments/phase10/long_context.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "long_context.md").exists() and (tmp_path / "long_context.png").exists()
