"""The errors a user is shown as one line, without a traceback, and the exit code each gets."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can act on. The CLI prints it as one line; ``exit_code`` is what it exits with."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """Bad input (config, data, CLI arguments), found before Ray starts."""

    exit_code = 2


class NothingToRank(UserError):
    """The search ran, but left no checkpoint to rank."""
