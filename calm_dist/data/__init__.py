"""The data pipeline by stage: records from a file (records), tokens with loss labels (tokenization),
padded and sharded micro-batches (batches)."""
