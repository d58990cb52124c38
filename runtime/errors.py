"""Errors the runtime raises for a user's mistake; the CLI prints them as one line and exits non-zero."""


class UtrError(Exception):
    """Base of every error that is the input's fault, not a bug."""


class InputError(UtrError, ValueError):
    """A sequence file or sequence that cannot be used as given."""


class BundleError(UtrError):
    """A bundle folder that is missing, incomplete, corrupted or of another format."""
