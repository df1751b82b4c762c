"""Exceptions of the merge job.

Every error that means "the input is wrong" derives from MergeError, so the `calm merge` command can
print it as one line and exit 2. Messages name the file, tensor or config key at fault.
"""

from __future__ import annotations


class MergeError(Exception):
    """Bad input: a config, a checkpoint, an examples file or an output folder that cannot be used."""


class ConfigError(MergeError):
    """The YAML config is malformed or inconsistent; the message starts with the key path."""


class CheckpointError(MergeError):
    """A checkpoint folder or safetensors file is missing, unreadable or malformed."""


class HeaderError(CheckpointError):
    """A safetensors file that is not whole and well formed: `path` names it, `problem` says what is wrong
    (the message is both, so callers with their own wording, such as the training preflight, reuse them)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def __reduce__(self):  # pickled with its two fields, not the joined message
        return type(self), (self.path, self.problem)


class IncompatibleInputsError(MergeError):
    """The inputs cannot be merged together: names, shapes, dtypes or vocabularies differ."""


class OutputError(MergeError):
    """The output folder cannot be used: it is an input, holds something else, or is a different merge."""


class ExamplesError(MergeError):
    """The examples file for data-derived weights is missing or malformed."""
