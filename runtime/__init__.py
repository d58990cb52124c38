"""utr_runtime: run exported 3UTRBERT bundles with NumPy and an inference engine (no PyTorch)."""

from .tokenizer import KmerTokenizer

__version__ = "0.1.0"
__all__ = ["KmerTokenizer", "__version__"]
