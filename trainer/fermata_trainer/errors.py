"""Exception types the trainer raises for problems that retrying will not fix.

The CLI maps every :class:`TrainerConfigError` to
:data:`~fermata_api.contract.EXIT_CONFIG_ERROR`, so the operator marks the run failed
instead of restarting the pod.
"""

from __future__ import annotations


class TrainerConfigError(Exception):
    """A permanent problem with the configuration, the dataset or the model reference."""


class StorageError(Exception):
    """A storage operation failed after all retries."""


class ObjectNotFoundError(StorageError, KeyError):
    """The object (or file) does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "object not found"
