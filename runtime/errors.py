"""Errors the runtime raises for a user's mistake; the CLI prints them as one line and exits non-zero."""


class UtrError(Exception):
    """Base of every error that is the input's fault, not a bug."""


class InputError(UtrError, ValueError):
    """A sequence file or sequence that cannot be used as given.

    With `index`, the error is about that sequence of a batch: `detail` says what is wrong with it, and the
    message reads "sequence <index>: <detail>" (the CLI names the record instead).
    """

    def __init__(self, detail: str, index: int | None = None):
        super().__init__(detail if index is None else f"sequence {index}: {detail}")
        self.detail = detail
        self.index = index


class BundleError(UtrError):
    """A bundle folder that is missing, incomplete, corrupted or of another format."""


class EngineError(UtrError):
    """The engine failed while running a model it had loaded (out of memory, an input it cannot take)."""


def engine_failed(name: str, engine: str, error: Exception) -> EngineError:
    """One line from an engine's multi-line failure message."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return EngineError(f"{name}: {engine} failed while running it ({text})")


class UntrainedModelWarning(UserWarning):
    """The bundle holds untrained (random-init) weights: its outputs are fit for tests and speed, not for analysis."""

    @staticmethod
    def sentence(bundle) -> str:
        """What every warning about such a bundle says (load, verify, a cluster run)."""
        return f"{bundle} holds untrained (random-init) weights: its outputs are for tests and timing, not for analysis"


class InputWarning(UserWarning):
    """Part of an input is left out or read in a way the user may not expect (e.g. a stretch shorter than k)."""
