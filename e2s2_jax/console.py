"""The jobs' console messages (progress lines, warnings, summaries): one Python logger,
`e2s2_jax.console`, written bare to stdout by process 0 only.

Library modules keep their own `logging.getLogger(__name__)` loggers, which reach the root
logger's handlers as before; this one does not propagate, so a message appears once.
"""

from __future__ import annotations

import logging
import sys

import jax

LOGGER_NAME = "e2s2_jax.console"


class _Stdout(logging.Handler):
    """Writes each message to the current `sys.stdout` (a test's capture, a redirect), flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging's convention: report on stderr, never raise
            self.handleError(record)


def _on_process_zero(record: logging.LogRecord) -> bool:
    # Read when a message is logged, after `jax.distributed.initialize()`, never at import.
    return jax.process_index() == 0


def _console_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = _Stdout()
        handler.addFilter(_on_process_zero)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


console = _console_logger()
