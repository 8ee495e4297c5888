"""MAML over several devices gives the meta-gradient of one device running the whole meta-batch.

torch: two gloo processes on this machine's CPU, each adapting half of the tasks (``group=``).
JAX: two host devices in a fresh interpreter (``XLA_FLAGS=--xla_force_host_platform_device_count=2``
must be set before JAX starts), the tasks split over a mesh (``mesh=``). Both in float64 through
the fused kernels (the Triton interpreter on CPU), full MAML and FO-MAML, against the same call
without a group or mesh; the split differs from one device only in the order of the additions.
A meta-batch that does not divide by the device count is refused by name. On the GPU (marked
``gpu``), the phase-10 entry point at world size 1: torchrun with one process, and a JAX mesh of
one device.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from theria_torch import maml, models, tasks

REPO = Path(__file__).resolve().parents[1]
FUSED = "triton_full_fused"
DEVICES = 2
# The smallest shapes the fused kernels take (head dim 8): the interpreter's time grows with them.
FAMILY = dict(vocab_size=6, seq_len=4, n_classes=2, n_signal=1)
MODEL = dict(d_model=8, n_heads=1, n_layers=1)
N_TASKS, K, INNER_LR = 2, 2, 0.3
METHODS = {"maml": False, "fo_maml": True}
# float64: one device and the split differ in the order of the additions only.
TOL = 1e-12
NOT_DIVIDING = "tasks: a meta-batch of 3 tasks does not split evenly over the 2 devices of `{}`"


def torch_problem(backend: str = FUSED):
    """Seeded float64 loss, parameters and global meta-batch (the same in every process)."""
    family = tasks.make_family("sequence_classification", **FAMILY)
    config = models.ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, **MODEL)
    model = models.TransformerStack(config, backend=backend, seed=1, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    batch = tasks.as_torch(tasks.sample_meta_batch(family, np.random.default_rng(2), N_TASKS, K, K),
                           dtype=torch.float64)
    return models.make_loss_fn(model, family.loss), params, batch


def gloo_worker(rank: int, store_path: str, out_dir: str):
    """One of the two ranks: the split results, and some of one device's (rank 0: MAML; rank 1:
    FO-MAML and the meta-test loss, so that the two share the work), to a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, DEVICES), rank=rank, world_size=DEVICES)
    group = dist.group.WORLD
    loss_fn, params, batch = torch_problem()
    saved = {"error": ""}
    three_tasks = tasks.TaskBatch(*(torch.cat([field, field])[:3] for field in batch))
    try:
        maml.meta_gradient(params, three_tasks, loss_fn, inner_lr=INNER_LR, steps=1, first_order=False,
                           group=group)
    except ValueError as error:
        saved["error"] = str(error)
    for index, (method, first_order) in enumerate(METHODS.items()):
        saved[method] = maml.meta_gradient(params, batch, loss_fn, inner_lr=INNER_LR, steps=1,
                                           first_order=first_order, group=group)
        if index == rank:
            saved[method + "/one_device"] = maml.meta_gradient(params, batch, loss_fn, inner_lr=INNER_LR,
                                                               steps=1, first_order=first_order)
    saved["evaluate"] = maml.evaluate(params, batch, loss_fn, inner_lr=INNER_LR, steps=1, group=group)
    if rank == 1:
        saved["evaluate/one_device"] = maml.evaluate(params, batch, loss_fn, inner_lr=INNER_LR, steps=1)
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def relative_error(actual: dict, expected: dict) -> tuple[float, str]:
    """‖actual − expected‖ / ‖expected‖ over all tensors, and the name of the worst tensor."""
    def flat(tree):
        return torch.cat([tree[name].reshape(-1) for name in sorted(tree)])

    worst = max(expected, key=lambda name: (actual[name] - expected[name]).abs().max())
    return float((flat(actual) - flat(expected)).norm() / flat(expected).norm()), worst


# The CPU ranks run Triton 3.6's interpreter, which numpy 2.4 breaks (constraints.txt pins 2.3 for
# CI); a GPU machine's image may carry a newer numpy, and it has the world-size-1 GPU test instead.
needs_interpreter = pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) >= "2.4.0",
                                       reason="Triton 3.6's interpreter needs numpy < 2.4 (constraints.txt)")


@needs_interpreter
def test_gloo_ranks_give_the_one_device_meta_gradient(tmp_path, monkeypatch, one_torch_thread):
    # The ranks are CPU processes on any machine: the fused kernels run in the interpreter there,
    # which must be switched on before they import triton (they inherit this environment).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(gloo_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=DEVICES)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(DEVICES)]
    for rank, saved in enumerate(ranks):
        assert saved["error"].startswith(NOT_DIVIDING.format("group")), saved["error"]
        for index, method in enumerate(METHODS):
            grads, loss = saved[method]
            expected, expected_loss = ranks[index][method + "/one_device"]
            error, worst = relative_error(grads, expected)
            assert error <= TOL, f"rank {rank} {method}: relative error {error:.3e} > {TOL:g} (worst {worst!r})"
            torch.testing.assert_close(loss, expected_loss, rtol=TOL, atol=0)
        torch.testing.assert_close(saved["evaluate"], ranks[1]["evaluate/one_device"], rtol=TOL, atol=0)
    maml_vs_fo = relative_error(ranks[0]["fo_maml"][0], ranks[0]["maml"][0])[0]
    assert maml_vs_fo > 1e-3, "the test would not tell full MAML from FO-MAML"


# Runs in a fresh interpreter with two host devices; prints one JSON line.
JAX_PROGRAM = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from theria_jax import maml, models, tasks

    jax.config.update("jax_enable_x64", True)
    # XLA's optimisations cost more compile time than they save on these tiny programs.
    jax.config.update("jax_disable_most_optimizations", True)
    family_options, model_options, n_tasks, k, inner_lr, methods = json.loads(sys.argv[1])
    family = tasks.make_family("sequence_classification", **family_options)
    config = models.ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, **model_options)
    params = models.jax_params(models.init_params(config, 1), dtype=jnp.float64)
    batch = tasks.as_jax(tasks.sample_meta_batch(family, np.random.default_rng(2), n_tasks, k, k),
                         dtype=jnp.float64)
    loss_fn = models.make_loss_fn(config, family.loss, backend="triton_full_fused")
    mesh = Mesh(np.array(jax.devices()), ("tasks",))
    try:
        maml.meta_gradient(params, jax.tree.map(lambda x: jnp.concatenate([x, x])[:3], batch), loss_fn,
                           inner_lr=inner_lr, steps=1, first_order=False, mesh=mesh)
        error = ""
    except ValueError as caught:
        error = str(caught)

    def all_methods(params, batch, mesh):
        return {method: maml.meta_gradient(params, batch, loss_fn, inner_lr=inner_lr, steps=1,
                                           first_order=first_order, mesh=mesh)
                for method, first_order in methods.items()}

    one = jax.jit(lambda p, b: all_methods(p, b, None))(params, batch)
    split = jax.jit(lambda p, b: all_methods(p, b, mesh))(params, maml.shard_tasks(batch, mesh))
    as_lists = lambda tree: jax.tree.map(lambda x: np.asarray(x).tolist(), tree)
    print(json.dumps({"devices": len(jax.devices()), "error": error, "one": as_lists(one),
                      "split": as_lists(split),
                      "replicated": all(g.sharding.is_fully_replicated for g in jax.tree.leaves(split))}))
""")


@needs_interpreter
def test_jax_mesh_gives_the_one_device_meta_gradient():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    arguments = json.dumps([FAMILY, MODEL, N_TASKS, K, INNER_LR, METHODS])
    done = subprocess.run([sys.executable, "-c", JAX_PROGRAM, arguments], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == DEVICES
    assert result["error"].startswith(NOT_DIVIDING.format("mesh")), result["error"]
    assert result["replicated"], "the meta-gradient should be replicated over the mesh"
    for method in METHODS:
        (grads, loss), (expected, expected_loss) = result["split"][method], result["one"][method]
        error, worst = relative_error({n: torch.tensor(v) for n, v in grads.items()},
                                      {n: torch.tensor(v) for n, v in expected.items()})
        assert error <= TOL, f"{method}: relative error {error:.3e} > {TOL:g} (worst {worst!r})"
        assert abs(loss - expected_loss) <= TOL * abs(expected_loss), (method, loss, expected_loss)


def test_phase10_refuses_a_meta_batch_the_devices_cannot_share(tmp_path):
    """Before any work, naming the config key and the value that fixes it."""
    sys.path.insert(0, str(REPO))  # experiments/ is scripts, not an installed package
    from experiments.phase10 import run

    message = (r"maml.meta_batch = 4 does not split evenly over the 3 devices of --jax-devices; set it to a "
               r"multiple of 3 \(e.g. --set maml.meta_batch=6\)")
    with pytest.raises(SystemExit, match=message):
        run.main(["--frameworks", "jax", "--jax-devices", "3", "--no-progress", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir()), "nothing should be written"


def test_shard_tasks_without_a_group_is_the_identity():
    _, _, batch = torch_problem("reference")
    assert maml.shard_tasks(batch, None) is batch
    assert maml.all_reduce_mean([batch.support_x], None)[0] is batch.support_x


@pytest.mark.gpu
def test_phase10_world_size_one_on_the_gpu(tmp_path):
    """run.py at world size 1 on one GPU: torchrun with one process (torch, a process group of
    one NCCL rank, the meta-gradient replayed from a CUDA graph and all-reduced after it) and a JAX
    mesh of one device, both backends; the same losses as one device without either."""
    common = ["--methods", "maml", "--backends", "reference", FUSED, "--device", "cuda", "--meta-steps", "3",
              "--set", "train.eval_every=2", "--no-progress"]
    script = str(REPO / "experiments/phase10/run.py")
    commands = {
        "torch_group": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        script, "--frameworks", "torch", "--cuda-graph"],
        "jax_mesh": [sys.executable, script, "--frameworks", "jax", "--jax-devices", "1"],
        "one_device": [sys.executable, script, "--frameworks", "torch", "jax"],
    }
    runs = {}
    for name, command in commands.items():
        done = subprocess.run(command + common + ["--out", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        results = json.loads((tmp_path / name / "results.json").read_text())["runs"]
        runs.update({(name, run["framework"], run["backend"]): run for run in results})
        assert all(run["devices"] == 1 and run["tasks_per_s"] > 0 for run in results), results
    for (name, framework, backend), run in runs.items():
        single = runs[("one_device", framework, backend)]
        # float32: a group or mesh of one adds no arithmetic, but a graph replay may pick other cuBLAS
        # algorithms and XLA may fuse the shard_map program differently; Adam turns that rounding
        # into small parameter differences over the two updates before the last loss.
        assert run["final_meta_train_loss"] == pytest.approx(single["final_meta_train_loss"], rel=1e-3), \
            (name, framework, backend)
    assert runs[("torch_group", "torch", FUSED)]["rank_median_step_time_s"][0] > 0
