"""theria for JAX: the same fused kernels under jax.jit with every JAX transformation."""

from theria_jax.attention import attention, flash_attn_func
from theria_jax.reference import attention_reference
from theria_jax.rmsnorm import rmsnorm, rmsnorm_reference

__all__ = ["attention", "flash_attn_func", "attention_reference", "rmsnorm", "rmsnorm_reference"]
