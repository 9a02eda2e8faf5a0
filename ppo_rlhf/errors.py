"""Exceptions the CLI turns into one-line messages (exit code 2 for usage errors)."""


class UsageError(ValueError):
    """Bad input from the user: a path, a flag, a file's contents. The CLI prints the message
    (no traceback unless --debug) and exits with code 2."""
