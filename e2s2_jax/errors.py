"""The error type of a configuration problem, shared by the entry points and the configurables."""


class ConfigError(ValueError):
    """A configuration problem found before any work starts; the message says what to change."""
