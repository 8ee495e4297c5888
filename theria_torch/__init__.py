"""theria for PyTorch: fused attention and rmsnorm with every derivative order."""

from theria_torch.attention import flash_attn_func, flash_attn_varlen_func, sdpa_custom
from theria_torch.drop_in import scaled_dot_product_attention
from theria_torch.reference import attention_reference, varlen_attention_reference
from theria_torch.rmsnorm import rmsnorm, rmsnorm_reference

__all__ = [
    "sdpa_custom", "flash_attn_func", "flash_attn_varlen_func", "scaled_dot_product_attention", "attention_reference",
    "varlen_attention_reference", "rmsnorm", "rmsnorm_reference",
]
