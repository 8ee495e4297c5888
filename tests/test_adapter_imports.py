"""Dependencies run one way (DESIGN.md): each adapter imports the framework-neutral modules below
it, never the other adapter or the other framework. Each check runs in a fresh interpreter, since
this one has imported everything already."""

import subprocess
import sys

import pytest

ADAPTERS = {
    # adapter: (its modules, the modules that must stay out of sys.modules)
    "theria_jax": (["theria_jax", "theria_jax.maml", "theria_jax.models", "theria_jax.tasks"], ["theria_torch"]),
    "theria_torch": (["theria_torch", "theria_torch.maml", "theria_torch.models", "theria_torch.tasks"],
                     ["jax", "theria_jax"]),
    "theria_kernels": (["theria_kernels._models", "theria_kernels._tasks"], ["torch", "jax"]),
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_imports_nothing_of_the_other_side(adapter):
    modules, forbidden = ADAPTERS[adapter]
    program = "; ".join([f"import {module}" for module in modules] + [
        "import sys",
        f"print(','.join(m for m in {forbidden!r} if m in sys.modules))",
    ])
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"importing {', '.join(modules)} imported {done.stdout.strip()}"
