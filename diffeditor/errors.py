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


class UsageError(DiffEditorError, TypeError):
    """A Python API argument has the wrong type (a spec that is not a path, dict or spec; a
    progress that is not callable); the message is one short line."""


class CheckErrors(DiffEditorError):
    """Several independent problems found before any model loads (a batch of specs): one
    line each, in :attr:`lines`."""

    def __init__(self, lines: list[str]):
        self.lines = list(dict.fromkeys(lines))  # one problem, one line: repeats dropped
        super().__init__("; ".join(self.lines))


def show(value, limit: int = 120) -> str:
    """A short, printable, one-line rendering of a user-given value (a path, a string) for an
    error message: control characters escaped, long values cut with an ellipsis."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else (
        str(value) if hasattr(value, "__fspath__") else f"<{type(value).__name__}>")
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped (``\\n``, ``\\x00``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_file(path) -> bool:
    """``Path(path).is_file()`` that answers False instead of raising for a name the OS refuses
    (too long, a NUL character)."""
    from pathlib import Path

    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def file_kind(path) -> str | None:
    """What ``path`` is when it is there but is not a regular file ("a folder", "a FIFO (named
    pipe)", "a character device", ...), else None (a regular file, or nothing there): a
    message then says what was given instead of "file not found"."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError, TypeError):
        return None
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


def not_a_file(path, what: str = "file") -> str:
    """The message for a ``path`` that is not a regular file: what it is, or "not found"."""
    kind = file_kind(path)
    name = show(path, 200)
    if kind is None:
        return f"{what} not found: {name}"
    return f"{name} is {kind}, not a {what}; give a regular file"
