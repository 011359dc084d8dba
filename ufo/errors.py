"""Errors a user can cause: each is one line naming the file, key, task or checkpoint at fault.

The CLI prints them without a traceback; anything else escaping is a bug.
"""


class UfoError(Exception):
    """A mistake in the user's input, reported as one line."""


class ConfigError(UfoError):
    """A config file or override is unreadable, has an unknown key, a wrong type or a bad value."""


class CheckpointError(UfoError):
    """A checkpoint is missing, truncated, or not a ufo supernet checkpoint."""


class ExportError(UfoError):
    """An export cannot proceed (unknown task, bad path, existing output) or failed verification."""


class DataError(UfoError):
    """Shards cannot be found, written or read (every shard of a task unreadable, say)."""
