"""The errors a user can meet, and how one is quoted in one line.

Each type is a user mistake or a refusal whose message is one line naming the field (or file),
the bad value and what is allowed; the command lines print that line and exit with code 2, with
no traceback (:func:`linf_jax.cli.run_guarded`). This module imports nothing heavy, so the
command lines can name every user-error type before JAX is imported.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line naming the field."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a workdir in use by another process)."""


class CheckpointError(RuntimeError):
    """A workdir without a usable checkpoint (missing, truncated or unreadable)."""


def first_line(err: BaseException, limit: int | None = None, *, with_type: bool = False,
               root: bool = False) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to
    ``limit`` characters: how a library's error is quoted inside one of ours. ``with_type``
    prefixes the type's name (``"OSError: ..."``); ``root`` quotes the innermost exception of
    the ``__cause__`` / ``__context__`` chain (a storage library's own words)."""
    if root:
        seen = set()
        while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
            seen.add(id(err))
            err = err.__cause__ or err.__context__
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    if with_type or not line:
        line = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return line if limit is None or len(line) <= limit else line[:limit] + "..."


class DataError(ValueError):
    """A data set cannot be loaded as asked; the message is one line naming the field."""


class EnsembleError(ValueError):
    """Members that cannot be stacked (different architectures or shapes)."""


class InputError(ValueError):
    """Inputs that do not fit the classifier (shape, range, labels, non-finite values)."""


class ExportError(ValueError):
    """Arguments that cannot be exported (platforms, batch), or no serializer."""


class PlotInputError(ValueError):
    """Input that cannot be plotted; the message is one line naming the argument and value."""
