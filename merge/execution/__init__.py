"""Merge execution: running the plan in local processes or on Ray.

One tensor as chunks, one shard task, local processes, Ray tasks, and the Cocktail losses partitioned
over Ray workers.
"""
