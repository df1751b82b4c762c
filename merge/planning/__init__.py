"""Merge planning: what to compute, in which shards and chunks, and with how much memory; no torch.

Matching the inputs' tensors, the output tensors, shards and chunk sizes, and the memory and time a
merge needs; for `calm plan` only, the inputs from their configs before their weights are downloaded
(config_only, which builds models on torch's meta device).
"""
