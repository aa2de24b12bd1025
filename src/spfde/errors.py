"""User-facing errors and the exit codes the CLI gives them.

Anything a user can cause (a config field, a file, a model the tool cannot handle) raises one
of these with a message that names what is wrong and how to fix it. The CLI prints the message
on one line and exits with the error's ``exit_code`` instead of showing a traceback
(docs/design.md, "Exit codes").
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class SpfdeError(Exception):
    """An error caused by user input or the environment (a file, the disk); the CLI exits with code 1."""

    exit_code = 1


class ConfigError(SpfdeError):
    """An invalid configuration value; the CLI exits with code 2.

    ``problems`` lists every problem found when a config is validated as a whole (issue 16: all
    of them are reported at once); the message is the one-line summary of them.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr: something the user set is contradictory but harmless,
    and the run goes on (docs/design.md, "Exit codes"). Under torchrun rank 0 says it for the run:
    every rank reads the same config and files."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


class NonFiniteLossError(SpfdeError):
    """The training loss became NaN or infinite (``train.on_nonfinite: stop``); the CLI exits with code 3."""

    exit_code = 3


@contextmanager
def config_caused() -> Iterator[None]:
    """Re-raise a :class:`SpfdeError` as a :class:`ConfigError` (exit code 2).

    For code whose every input comes from the config alone (the built-in trainer and
    ``spfde plan``/``flops`` build the model, optimizer and controller from it): a refusal there,
    such as an unreachable freezing target or an unknown freezing block, is the config's fault.
    """
    try:
        yield
    except ConfigError:
        raise
    except SpfdeError as e:
        raise ConfigError(str(e)) from None


_OOM = re.compile(r"can't allocate memory|not enough memory|out of memory", re.IGNORECASE)


@contextmanager
def memory_errors(at_start: bool) -> Iterator[None]:
    """An allocation failure as one line: a config error (exit 2) while a run starts (the config
    asks for more than the machine has: model.width, data.image_size, ...), else exit 1."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _OOM.search(str(e)):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(e))
        size = f" ({int(asked.group(1)) / 2**30:.3g} GiB asked for)" if asked else ""
        if at_start:
            raise ConfigError(f"not enough memory to start this run{size}; lower model.width, data.batch_size, "
                              "data.image_size or data.synthetic_size") from None
        raise SpfdeError(f"out of memory while training{size}; lower data.batch_size or model.width and start "
                         "again") from None
