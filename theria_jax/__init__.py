"""theria for JAX: the same fused kernels under jax.jit with every JAX transformation."""

from theria_jax.attention import attention, flash_attn_func, flash_attn_varlen_func
from theria_jax.drop_in import dot_product_attention
from theria_jax.reference import attention_reference, varlen_attention_reference
from theria_jax.rmsnorm import rmsnorm, rmsnorm_reference

__all__ = [
    "attention", "flash_attn_func", "flash_attn_varlen_func", "dot_product_attention", "attention_reference",
    "varlen_attention_reference", "rmsnorm", "rmsnorm_reference",
]
