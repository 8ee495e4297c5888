"""Full second-order MAML of a Hugging Face Llama on theria's transformers backend, against SDPA's math
backend (the only torch SDPA backend with a double backward).

A random-init ``LlamaForCausalLM`` (by default hidden 1024, 16 query heads, 4 key/value heads,
4 layers) is meta-trained on synthetic next-token tasks: each task is a random permutation ``π`` of
the vocabulary, and its sequences follow ``x[t + 1] = π(x[t])`` except for a few random tokens, so a
model can only predict well after adapting to the task. Each meta-step draws a batch of tasks and,
per task, takes one inner SGD step on a support batch and differentiates the query loss of the
adapted weights through that step (full MAML: Hessian-vector products through every attention
layer). The same model, with the same initial weights and tasks, runs once per
``attn_implementation``:

* ``theria``: ``theria_torch.hf.register()``, fused Triton kernels at every derivative order;
* ``sdpa``: transformers' SDPA backend inside ``sdpa_kernel(SDPBackend.MATH)``.

Before training, both compute the meta-gradient at the initial weights on the same tasks and the
script prints their relative difference; then each trains ``--steps`` meta-steps (after
``--warmup`` untimed ones) and prints milliseconds per meta-step, peak CUDA memory and the query
loss. Needs a CUDA GPU::

    python examples/hf_maml.py                                   # T = 4096, B = 2, bf16
    python examples/hf_maml.py --seq-len 1024 --steps 20         # shorter sequences
    python examples/hf_maml.py --backends theria                 # skip the math backend

An out-of-memory error on one backend is reported as such and the other still runs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

BACKENDS = ("theria", "sdpa_math")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (support and query)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per support and per query batch")
    parser.add_argument("--tasks", type=int, default=1, help="tasks per meta-step")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.1, help="share of tokens drawn at random")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=10, help="timed meta-steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-steps first (kernel compilation)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sample_tasks(args, generator):
    """(support ids, query ids), each (tasks, batch, seq_len): per task a permutation chain with noise."""
    shape = (args.tasks, 2 * args.batch, args.seq_len)
    permutations = torch.stack([torch.randperm(args.vocab, generator=generator) for _ in range(args.tasks)])
    ids = torch.empty(shape, dtype=torch.long)
    ids[..., 0] = torch.randint(0, args.vocab, shape[:2], generator=generator)
    noise = torch.rand(shape, generator=generator) < args.noise
    random_tokens = torch.randint(0, args.vocab, shape, generator=generator)
    for t in range(1, args.seq_len):
        follows = torch.gather(permutations, 1, ids[..., t - 1])
        ids[..., t] = torch.where(noise[..., t], random_tokens[..., t], follows)
    ids = ids.cuda()
    return ids[:, :args.batch], ids[:, args.batch:]


def make_meta_gradient(model, inner_lr):
    """meta_gradient(params, support, query) -> (grads, mean query loss): one inner SGD step per task
    on the support batch, the query loss of the adapted weights, differentiated through the inner step."""
    names = [name for name, _ in model.named_parameters()]

    def loss(weights, ids):
        return torch.func.functional_call(model, dict(zip(names, weights)), (ids,), {"labels": ids}).loss

    def meta_gradient(params, support, query):
        total, losses = [torch.zeros_like(p) for p in params], []
        for task_support, task_query in zip(support, query):
            inner = torch.autograd.grad(loss(params, task_support), params, create_graph=True)
            adapted = [p - inner_lr * g for p, g in zip(params, inner)]
            query_loss = loss(adapted, task_query)
            total = [t + g for t, g in zip(total, torch.autograd.grad(query_loss, params))]
            losses.append(query_loss.detach())
        return [t / len(support) for t in total], torch.stack(losses).mean()

    return meta_gradient


def build_model(args, implementation, dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, use_cache=False, attention_dropout=0.0)
    torch.manual_seed(args.seed)   # the same initial weights for every backend
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation,
                                                         dtype=dtype).cuda()


def attention_context(backend):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if backend == "sdpa_math" else nullcontext()


def run(args, backend, dtype, reference_grads):
    """Meta-trains one backend; returns the meta-gradient at the initial weights on the first tasks."""
    model = build_model(args, "theria" if backend == "theria" else "sdpa", dtype)
    params = [p.detach().requires_grad_() for p in model.parameters()]
    meta_gradient = make_meta_gradient(model, args.inner_lr)
    optimizer = torch.optim.Adam(params, lr=args.outer_lr)
    # The same tasks for every backend, drawn before the clock starts (the chains are built on the host).
    generator = torch.Generator().manual_seed(args.seed + 1)
    tasks = [sample_tasks(args, generator) for _ in range(1 + args.warmup + args.steps)]
    with attention_context(backend):
        first_grads, _ = meta_gradient(params, *tasks[0])
        # Kept on the host, so that they do not count in the peak memory measured below.
        first_grads = [g.float().cpu() for g in first_grads]
        if reference_grads is not None:
            difference = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(first_grads, reference_grads)))
            norm = torch.sqrt(sum((b ** 2).sum() for b in reference_grads))
            print(f"  meta-gradient at the initial weights: relative difference to the first backend "
                  f"{(difference / norm).item():.2e}")
        losses = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            grads, query_loss = meta_gradient(params, *tasks[1 + step])
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            losses.append(query_loss)
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {elapsed * 1e3:8.1f} ms per meta-step, peak memory {peak:.1f} GiB, query loss "
          f"{losses[0].item():.3f} -> {losses[-1].item():.3f} (first and last meta-step)")
    return first_grads


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("examples/hf_maml.py needs a CUDA GPU")
    from theria_torch import hf

    hf.register()
    dtype = getattr(torch, args.dtype)
    print(f"Llama: hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, {args.layers} layers, "
          f"vocab {args.vocab}; {args.tasks} task(s) x B{args.batch} x T{args.seq_len}, {args.dtype}; "
          f"{torch.cuda.get_device_name()}")
    reference_grads = None
    for backend in args.backends:
        print(f"{backend}:")
        try:
            grads = run(args, backend, dtype, reference_grads)
        except torch.cuda.OutOfMemoryError:
            print("  out of memory")
            continue
        finally:
            torch.cuda.empty_cache()
        reference_grads = grads if reference_grads is None else reference_grads


if __name__ == "__main__":
    main()
