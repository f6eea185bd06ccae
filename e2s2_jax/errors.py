"""The error types the entry points turn into one-line messages, and their exit statuses.

Exit statuses of `python -m e2s2_jax.main` (README, "Reliability"):
  0   finished;
  2   bad input or configuration, or a checkpoint that cannot be read or written (a damaged
      one with no good one before it, a failed save); nothing past the last good checkpoint is
      kept, and the message names the file or binding and the fix;
  3   training stopped on a non-finite loss, gradient or state (the last good checkpoint kept);
  75  preempted (SIGTERM): the current step was saved; relaunch the same command to resume
      (75 is EX_TEMPFAIL, "try again", so a retry-until-success wrapper requeues the run).
"""

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A configuration problem found before any work starts; the message says what to change."""


class RunLockedError(ConfigError):
    """MODEL_DIR is in use by another live run."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


class TrainingStopped(RuntimeError):
    """The trainer stopped early on purpose; `exit_status` says why (see the table above)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status
