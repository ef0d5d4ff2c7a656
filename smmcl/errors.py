"""The errors a user can cause and fix, one class per kind, in a leaf module every layer can import.

Each message names the file or setting and the fix; the entry points print it as one line and exit with
status 1 (no traceback). They are also re-exported where they are raised most: ``smmcl.config``,
``smmcl.data.dataset``, ``smmcl.models.weights`` and ``smmcl.engine.checkpoint``.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting the user can fix (in the experiment's ``config.py`` or with ``--set``)."""


class UnknownKeyError(ConfigError, KeyError):
    """An override names a key the config does not have (a KeyError too, for ``dict``-style callers)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0])


class DatasetError(ValueError):
    """A problem with the data on disk; the message names the file and the fix.

    Attributes:
        problems: one message per problem.
    """

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f'{len(self.problems)} dataset problems:\n' + '\n'.join(f'- {p}' for p in self.problems)
        super().__init__(message)


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: missing, unreadable, without model weights,
    or built for another model. The message names the file and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint's path (also a ``FileNotFoundError``)."""
