"""The errors visbatch reports to its user, each with its exit code.

Code in ``core`` raises these for anything the user can act on; the CLI maps
them to one line on stderr and the exit code (see README, "Exit codes").
Any other exception is a bug: the CLI reports it as an internal error with
exit 3, never as a usage error.
"""

from __future__ import annotations


class VisbatchError(Exception):
    """A failure with a one-line message for the user."""

    exit_code = 3


class UsageError(VisbatchError, ValueError):
    """What the user asked for cannot be done as asked (bad option value, missing input,
    output exists, resume mismatch): exit 2. Also a ValueError, for callers of the library."""

    exit_code = 2


class FatalError(VisbatchError):
    """The run cannot go on (model or checkpoint, I/O failure): exit 3."""

    exit_code = 3


class Interrupted(VisbatchError):
    """Stopped by SIGINT/SIGTERM before the work was done: exit 130 (the message says how to resume)."""

    exit_code = 130
