"""Errors shown to users: one clear line, never a traceback."""


class NanoseekError(Exception):
    """A user-facing error whose message names the problem (file, line, field)."""
