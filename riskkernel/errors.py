"""Exit statuses and the few exceptions a caller must tell apart.

    RkError            rk itself cannot do what was asked; the message is one line for a person
      ConfigError      a flag, environment variable or config file holds a bad value
      LedgerError      the ledger cannot be opened or written

Everything else is a builtin. The CLI maps these to exit statuses in one place (cli/__init__.py).
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2
    HALTED = 3  # the run was halted by a budget or a kill and the child exited 0
    RK_FAILED = 125  # rk itself could not start: bad config, port, ledger
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127
    SIGNALLED = 128  # + N when the child died of signal N


class RkError(Exception):
    """A failure of rk itself, reported as one line and exit status 125."""


class ConfigError(RkError):
    pass


class LedgerError(RkError):
    pass
