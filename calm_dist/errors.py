"""Errors that mean the user's input is wrong (as opposed to a bug): the CLI prints them in one line."""


class InputError(ValueError):
    """Bad input (a file, a tensor, a config key, a record), not a failure of the program or the machine.
    Deterministic: running again gives the same error, so it is reported in one line (exit 2) and a run
    is never retried for it, wherever it is raised (on the driver or on a worker)."""


class CompositionError(InputError):
    """A composition that cannot be built as asked: bad connections, incompatible models, a mismatched
    checkpoint. The message names the model, layer, file or key at fault."""
