"""Telling a worker's input error from a failure worth retrying.

Workers raise calm_dist.errors.InputError (or a subclass: DataError, CompositionError, ConfigError)
for bad input they meet: the same input fails the same way every time, so the driver reports it in
one line and never retries. Ray Train hands worker exceptions back wrapped (in its own error types,
with the original as an attribute or cause); this finds the original without relying on the wrapper's
internals.
"""

from __future__ import annotations

from calm_dist.errors import InputError


def _causes(error: BaseException):
    """error, then every exception reachable from it through causes, contexts and attributes."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, *getattr(current, "__dict__", {}).values()]
        for value in linked:
            if isinstance(value, BaseException):
                pending.append(value)
            elif isinstance(value, dict):  # Ray Train's WorkerGroupError: rank -> exception
                pending.extend(v for v in value.values() if isinstance(v, BaseException))


def input_error_in(error: BaseException) -> InputError | None:
    """The first input error among the causes of a failed run (lowest rank first), if any."""
    return next((cause for cause in _causes(error) if isinstance(cause, InputError)), None)


def first_line(error: BaseException) -> str:
    """A failure's own message in one line, for the note that a run is retried."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
