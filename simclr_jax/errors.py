"""The error a user's mistake raises.

A config, dataset, path or checkpoint that cannot work ends in one
``UserError`` whose message names the field, file or value and what to do;
main.py prints that message alone, without a traceback, and exits non-zero.
Tracebacks are for bugs. Raised before anything is written to the workdir.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message says how."""


class DataError(UserError):
    """A dataset that cannot be read as the config asks: unknown, not prepared,
    an empty or malformed image folder, a split that does not exist."""


class StorageError(UserError):
    """A path that cannot be written or read as a run needs (a file where a
    folder is needed, no permission, a full disk)."""


class CheckpointError(UserError):
    """A path that cannot serve as weights or be resumed from (missing, not
    SimCLR's, another architecture, damaged), with what to pass or do instead."""
