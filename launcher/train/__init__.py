"""`calm train`: the driver (command) and what each Ray Train worker runs (worker)."""
