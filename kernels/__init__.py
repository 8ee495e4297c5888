"""Framework-neutral Triton kernels (installed as ``theria_kernels``): one module per op."""
