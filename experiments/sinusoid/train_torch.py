"""The sinusoid protocol in PyTorch, through ``theria_torch.maml`` (torch.func, vmap over tasks).

``train_jax`` is the same module for JAX: the same functions, arguments and result layout.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import vmap
from tqdm import tqdm

from experiments.sinusoid import protocol as P
from theria_torch import maml
from theria_torch.tasks import TaskBatch, as_torch

FRAMEWORK = "torch"


def mlp_loss(params: maml.Params, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the ReLU MLP on one task's points.

    Arguments:
        params: :func:`protocol.init_mlp`'s layout as tensors.
        batch: inputs (k, 1, 1) (theria's sequence layout, length 1) and targets (k,).
    Returns:
        A 0-d tensor.
    """
    x, y = batch
    n_layers = len(params) // 2
    h = x.reshape(-1, 1)
    for i in range(n_layers):
        h = h @ params[f"layer{i}.weight"] + params[f"layer{i}.bias"]
        if i < n_layers - 1:
            h = torch.relu(h)
    return torch.mean((h[:, 0] - y) ** 2)


def to_params(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> maml.Params:
    return {name: torch.tensor(array, dtype=dtype) for name, array in arrays.items()}


def adaptation_losses(params: maml.Params, tasks: TaskBatch, *, inner_lr: float, max_steps: int) -> np.ndarray:
    """Per-task query loss after 0 .. ``max_steps`` inner steps (first order: no outer derivative).

    Returns:
        (max_steps + 1, n_tasks) float64.
    """
    def one_task(task):
        adapted, losses = params, [mlp_loss(params, (task.query_x, task.query_y))]
        for _ in range(max_steps):
            adapted = maml.inner_adapt(adapted, (task.support_x, task.support_y), mlp_loss, inner_lr=inner_lr,
                                       steps=1, first_order=True)
            losses.append(mlp_loss(adapted, (task.query_x, task.query_y)))
        return torch.stack(losses)

    return vmap(one_task, out_dims=1)(tasks).detach().double().numpy()


def train(protocol: P.Protocol, shots: int, method: str, *, dtype: torch.dtype = torch.float32,
          progress: bool = True, compile: bool = False) -> dict:
    """Meta-train one method at K = ``shots`` with Adam, then evaluate it on the held-out tasks.

    Arguments:
        compile: run the meta-gradient and the Adam update through ``torch.compile`` (on a CPU
            about 6× faster per iteration at this size, where eager time is the per-op Python of
            torch.func's transforms and of Adam; compiling takes 10–40 s per run).
    Returns:
        ``{"framework", "shots", "method", "train_s", "params", "curve", "final"}``: ``params`` as
        float64 numpy arrays; ``curve`` with lists ``iteration``, ``train_loss`` (mean meta-loss
        since the previous point), ``test_loss_1`` and ``test_loss_{eval_steps}`` (held-out MSE
        after that many inner steps at ``inner_lr``); ``final`` maps each evaluation inner lr (as
        a string) to one :func:`protocol.summarise` per step count 0 .. eval_steps.
    """
    settings = P.method_settings(protocol, method)

    def meta_gradient(params, tasks):
        return maml.meta_gradient(params, tasks, mlp_loss, **settings)

    params = to_params(P.init_mlp(protocol), dtype)
    optimizer = torch.optim.Adam(list(params.values()), lr=protocol.outer_lr)
    update = optimizer.step
    if compile:
        meta_gradient = torch.compile(meta_gradient)
        update = torch.compile(update)
    held_out = as_torch(P.test_tasks(protocol, shots), dtype=dtype)
    curve = {"iteration": [], "train_loss": [], "test_loss_1": [], f"test_loss_{protocol.eval_steps}": []}
    window = []
    bar = tqdm(total=protocol.iterations, desc=f"{FRAMEWORK} K={shots} {method}", disable=not progress,
               mininterval=1.0)
    start = time.perf_counter()
    for first in range(0, protocol.iterations, protocol.chunk):
        batches = P.train_batches(protocol, shots, first, protocol.chunk)
        if method == "pretrained":
            batches = P.joint_regression_tasks(batches)
        batches = as_torch(batches, dtype=dtype)
        for i in range(protocol.chunk):
            grads, loss = meta_gradient(params, TaskBatch(*(field[i] for field in batches)))
            for name, p in params.items():
                p.grad = grads[name]
            update()
            window.append(loss)
        bar.update(protocol.chunk)
        done = first + protocol.chunk
        if done % protocol.curve_every == 0:
            curve["iteration"].append(done)
            curve["train_loss"].append(float(torch.stack(window).mean()))
            window = []
            for steps in (1, protocol.eval_steps):
                curve[f"test_loss_{steps}"].append(
                    float(maml.evaluate(params, held_out, mlp_loss, inner_lr=protocol.inner_lr, steps=steps)))
            bar.set_postfix(test_loss_1=f"{curve['test_loss_1'][-1]:.3f}")
    train_s = time.perf_counter() - start
    bar.close()
    lrs = (protocol.inner_lr, *(protocol.baseline_lrs if method == "pretrained" else ()))
    final = {str(lr): [P.summarise(row) for row in adaptation_losses(params, held_out, inner_lr=lr,
                                                                       max_steps=protocol.eval_steps)]
             for lr in lrs}
    return {"framework": FRAMEWORK, "shots": shots, "method": method, "train_s": train_s,
            "params": {name: p.detach().double().numpy() for name, p in params.items()},
            "curve": curve, "final": final}
