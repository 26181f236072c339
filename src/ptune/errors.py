"""The project's own exceptions.

Every user mistake ptune can recognise (a bad file, a bad config value, an adapter that does not fit
the base model) raises a subclass of :class:`PtuneError` whose message names the problem and the fix
in one line. The CLI prints that line and exits non-zero, without a traceback.
"""


class PtuneError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(PtuneError, ValueError):
    """A configuration value is invalid (names the field, the value and what would be valid)."""


class TemplateError(ConfigError):
    """A prompt template is malformed (names the position and the fix)."""


class DataError(PtuneError, ValueError):
    """A data file or record is unusable (names the file, the line and the problem)."""


class ModelLoadError(PtuneError, OSError):
    """A base model cannot be found or loaded (names what was tried)."""


class AdapterMismatchError(PtuneError, ValueError):
    """A saved adapter does not fit the base model it is loaded onto (names both models)."""


class UnsupportedModelError(PtuneError, ValueError):
    """A method cannot act on this architecture (names supported alternatives)."""


class TrainingInterrupted(PtuneError):
    """Training stopped by Ctrl-C after saving a checkpoint (the CLI exits with status 130)."""
