"""Typed errors of the runtime. Each message says what is wrong and what to change."""


class SpecReasonError(Exception):
    """Base class: every error the runtime raises on bad input derives from it."""


class BundleError(SpecReasonError):
    """The bundle on disk does not match its manifest (missing file, hash, schema, IO names)."""


class CacheLimitError(SpecReasonError):
    """A request needs more KV-cache memory or context than the bundle or the user allows."""


class ConfigError(SpecReasonError, ValueError):
    """An argument is out of range or inconsistent; the message names it and the valid values."""
