"""Errors that mean the user's input is wrong (as opposed to a bug): the CLI prints them in one line."""


class CompositionError(ValueError):
    """A composition that cannot be built as asked: bad connections, incompatible models, a mismatched
    checkpoint. The message names the model, layer, file or key at fault."""
