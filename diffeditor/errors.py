"""User-facing errors: each says what is wrong and what to do, and the CLI prints it in one line
without a traceback."""


class DiffEditorError(Exception):
    """Base class of errors meant for the user."""


class SpecError(DiffEditorError, ValueError):
    """A spec (or a command-line equivalent) is invalid; the message names the field."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class ModelError(DiffEditorError):
    """A model could not be found or loaded; the message says how to get it."""


class OutputError(DiffEditorError):
    """An output cannot be written (exists without --force, folder not writable)."""
