"""Everything per worker under DeepSpeed (the only package that imports it): the Trainer, the engine,
partitioned loading of the frozen anchor, pipelined placement, collectives, lockstep evaluation,
training checkpoints and the memory plan."""
