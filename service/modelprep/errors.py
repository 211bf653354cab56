"""User-facing errors of model preparation.

The CLI turns a ``PrepError`` into one clear line on stderr and exit code 2: bad input never ends in a bare
traceback. Anything else is a bug and keeps its traceback.
"""


class PrepError(Exception):
    """A problem the user can fix (bad data, bad configuration, missing package)."""


class ConfigError(PrepError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the field and the value."""


class DataError(PrepError):
    """The labeled data cannot be used as given; the message names the file and, where known, the line."""
