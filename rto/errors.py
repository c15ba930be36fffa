"""Errors that reach the user.

`UserError` means bad input (config, data, paths, flags): the CLI prints its message on one line
and exits with code 2, without a traceback. `ClusterError` means the cluster cannot carry the job
(no room for a group, more lost actors in a row than the fault tolerance allows): one line, exit
code 3. Anything else is a bug or an environment failure (exit code 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. The message names the file and the field, and says what was expected."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        parts = [p for p in (source, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source = source
        self.field = field


class ClusterError(Exception):
    """The cluster cannot carry the job; the message says what is missing and how to resume."""

    exit_code = 3


class FieldError(ValueError):
    """A config check's failure that names the field to blame (relative to the section whose
    validator raised it); the config loader shows it instead of the section's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
