"""Exceptions the CLI turns into one-line messages (exit code 2 for usage errors)."""


class UsageError(ValueError):
    """Bad input from the user: a path, a flag, a file's contents. The CLI prints the message
    (no traceback unless --debug) and exits with code 2."""


class DataError(UsageError):
    """A data file (prompts, preferences) holds a bad record. The message starts with
    `path:line: ` when both are known, so an editor can jump to the offending line."""

    def __init__(self, reason: str, *, path: object = None, line: int | None = None):
        self.reason, self.path, self.line = reason, path, line
        where = f"{path}:{line}: " if path is not None and line is not None else (
            f"{path}: " if path is not None else "")
        super().__init__(where + reason)


class CheckpointError(UsageError):
    """A model or checkpoint directory cannot be used: an unsupported architecture, a malformed
    config.json, tensors that don't fit the config, a tokenizer that doesn't fit the model, a
    training checkpoint that is incomplete, damaged or unreadable."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory, or a file it needs (config.json, weights, shards), does not exist."""


class NonFiniteUpdates(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient (NaN / inf): training
    stops with the newest checkpoint intact (skipped steps change nothing)."""
