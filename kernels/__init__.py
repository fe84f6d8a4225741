"""Triton kernels for the dispatch ops, installed as ``moe_routing._kernels``.

Kernels here take expert-sorted indices, offsets and weights, never router objects. Importing this package
must not require Triton: each kernel module imports it lazily.
"""
