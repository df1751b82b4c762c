"""Streaming, sharded model merges (LM-Cocktail and friends): `calm merge config.yaml`.

One concept per module: config (the validated YAML), checkpoint (a Hugging Face folder's tensors),
safetensors_io (header validation, streaming writer), reader (chunks of the inputs, read ahead in planned order),
inputs (matching tensors across inputs), method_specs (each method's parameters and shape, free of
torch), methods (merge formulas registered by name), exact (correctly
rounded linear combinations; fast_kernel builds its compiled pass), weights (Cocktail weights from examples),
plan (output tensors, shards, chunk size), stream (one tensor as chunks), shard (one shard task),
execute (local processes), ray_runner (Ray tasks), manifest (resume and verify), output (the output
folder and its copied files), report, job (the whole sequence), cli, tiny (demo checkpoints).
"""
