"""The one exception type for bad input, the exit codes, and the failures a run reports in one line.

Anything a user can get wrong (a config key, a value, a path, a command-line flag) raises
`UsageError` with a message that names the field and what was expected. The CLI turns it into
a one-line message on stderr and exit code 2, without a traceback, before any work starts.
"""


class UsageError(Exception):
    """Bad input: the message names the field (or file) and what was expected."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):
        # raised in a worker process (Ray, a process pool, spawned ranks) and re-raised in the
        # parent: pickle rebuilds it from (field, message), not from the formatted text
        return type(self), (self.field, self.message)


class ConfigError(UsageError):
    """Bad value in a config file or a --set override."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 3  # checkpointed after SIGTERM/SIGUSR2; `bigbatch train --resume RUN_DIR` continues
EXIT_DIVERGED = 4  # the training loss became non-finite; summary.json has status "diverged"
EXIT_PEER_LOST = 5  # a collective waited dist.timeout_s for a peer rank (or its connection closed); resume from the last checkpoint


class PeerLostError(RuntimeError):
    """A collective failed because another rank stopped answering (hung, stopped, killed, its
    node lost). The message says which step, the timeout and the last checkpoint."""
