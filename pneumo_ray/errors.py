"""The errors a user is shown as one line, without a traceback, and the exit code each gets."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can act on. The CLI prints it as one line; ``exit_code`` is what it exits with."""

    exit_code = 1


class BadInput(UserError):
    """Input that cannot work: a config, a data file or a command-line argument. Found before Ray starts."""

    exit_code = 2


class ConfigError(BadInput, ValueError):
    """A config field (or the data it names) that cannot work; the message starts with the field or file."""


class BadArgument(BadInput):
    """A command-line argument that names no usable thing: a folder with no finished sweep, a rank the
    leaderboard does not have."""


class NothingToRank(UserError):
    """The search ran, but left no checkpoint to rank."""


class StorageFull(UserError):
    """The experiment's storage ran short of space during the sweep, which stopped and saved its state."""
