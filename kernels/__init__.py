"""Triton kernels, one op per file; a leaf package that imports torch and triton only."""
