"""`calm plan`: memory per worker of a training or merge config, before anything starts."""
