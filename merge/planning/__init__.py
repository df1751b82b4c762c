"""Merge planning: what to compute, in which shards and chunks, and with how much memory; no torch.

Matching the inputs' tensors, the output tensors, shards and chunk sizes, and the memory and time a
merge needs.
"""
