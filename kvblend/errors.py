"""Exceptions whose message is one line a user can act on (the CLI prints it and exits non-zero)."""


class KvblendError(Exception):
    """Base class: str(exc) is a single line saying what is wrong, where, and what to do."""


class ConfigError(KvblendError, ValueError):
    """A configuration value, flag or environment override is invalid."""


class ModelError(KvblendError):
    """A model cannot be found, converted, or driven by kvblend."""


class StoreError(KvblendError):
    """The chunk KV store cannot satisfy a request."""


class ChunkMissingError(StoreError):
    """A chunk is not in the store (on no tier)."""


class ChunkCorruptError(StoreError):
    """A chunk file on disk failed hash verification, or is truncated or unreadable."""


class BudgetExceededError(StoreError):
    """A tier cannot hold a chunk without exceeding its byte budget (pinned chunks are never evicted)."""
