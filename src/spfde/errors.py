"""User-facing errors.

Anything a user can cause (a config field, a file, a model the tool cannot handle) raises one
of these with a message that names what is wrong and how to fix it. The CLI prints the message
on one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class SpfdeError(Exception):
    """An error caused by user input; the CLI exits with code 1."""

    exit_code = 1


class ConfigError(SpfdeError):
    """An invalid configuration value; the CLI exits with code 2."""

    exit_code = 2
