"""Merge methods: each method's parameters, the formulas by name, and correctly rounded arithmetic.

The correctly rounded linear combination has a compiled fast pass (fast_kernel, fast_pass.c).
"""
