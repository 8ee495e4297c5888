"""How far the bfloat16 full-MAML meta-gradient of each reference backend is from float64.

One meta-batch of t1024's task (4-way sequence classification) and model (2 layers, causal), at a
sequence length and width the CPU can afford; the exact value is the torch reference in float64.
Prints, per seed (a seed draws the initial weights and the meta-batch), the relative error of the
whole flattened meta-gradient for the torch reference and the JAX reference in bfloat16, then
their geometric means (docs/results/maml_t1024.md, issue 21 part 3)::

    python experiments/phase10/bf16_meta_gradient.py --t 256 --d-model 128 --heads 4 --k 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from theria_jax import maml as jax_maml, models as jax_models, tasks as jax_tasks  # noqa: E402
from theria_kernels._models import ModelConfig, init_params  # noqa: E402
from theria_kernels._tasks import make_family, sample_meta_batch  # noqa: E402
from theria_torch import maml as torch_maml, models as torch_models, tasks as torch_tasks  # noqa: E402

INNER_LR = 0.1  # t1024.yaml's


def torch_meta_gradient(model, family, params, batch, dtype):
    network = torch_models.TransformerStack(model, backend="reference", dtype=dtype)
    loss_fn = torch_models.make_loss_fn(network, family.loss)
    grads, _ = torch_maml.meta_gradient(torch_models.torch_params(params, dtype=dtype),
                                        torch_tasks.as_torch(batch, dtype=dtype), loss_fn,
                                        inner_lr=INNER_LR, steps=1, first_order=False)
    return np.concatenate([grads[name].double().numpy().ravel() for name in sorted(grads)])


def jax_meta_gradient(model, family, params, batch):
    loss_fn = jax_models.make_loss_fn(model, family.loss, backend="reference")
    step = jax.jit(functools.partial(jax_maml.meta_gradient, loss_fn=loss_fn, inner_lr=INNER_LR, steps=1,
                                     first_order=False))
    grads, _ = step(jax_models.jax_params(params, dtype=jnp.bfloat16), jax_tasks.as_jax(batch, dtype=jnp.bfloat16))
    return np.concatenate([np.asarray(grads[name], np.float64).ravel() for name in sorted(grads)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t", type=int, default=128, help="sequence length")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--k", type=int, default=8, help="support and query sequences per task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    family = make_family("sequence_classification", vocab_size=32, seq_len=args.t, n_classes=4, n_signal=16)
    model = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, d_model=args.d_model,
                        n_heads=args.heads, n_layers=2, causal=True)
    errors = []
    for seed in args.seeds:
        params = init_params(model, seed)
        batch = sample_meta_batch(family, np.random.default_rng([seed, 1, 0]), args.tasks, args.k, args.k)
        exact = torch_meta_gradient(model, family, params, batch, torch.float64)
        row = [np.linalg.norm(got - exact) / np.linalg.norm(exact)
               for got in (torch_meta_gradient(model, family, params, batch, torch.bfloat16),
                           jax_meta_gradient(model, family, params, batch))]
        errors.append(row)
        print(f"seed {seed}: torch reference {row[0]:.2e}  JAX reference {row[1]:.2e}  ratio {row[1] / row[0]:.2f}",
              flush=True)
    torch_mean, jax_mean = np.exp(np.mean(np.log(errors), axis=0))
    print(f"geometric mean: torch reference {torch_mean:.2e}  JAX reference {jax_mean:.2e}  "
          f"ratio {jax_mean / torch_mean:.2f}")


if __name__ == "__main__":
    main()
