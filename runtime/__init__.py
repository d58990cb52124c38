"""utr_runtime: run exported 3UTRBERT bundles with NumPy and an inference engine (no PyTorch).

    import utr_runtime
    model = utr_runtime.load("bundles/utrbert-6mer")
    vectors = model.embed(["ACGUAGCUAGCUAG...", ...])          # (N, 768), one per sequence
"""

from .bundle import Bundle
from .errors import BundleError, EngineError, InputError, InputWarning, UntrainedModelWarning, UtrError
from .model import Model, load
from .tokenizer import KmerTokenizer
from .verify import verify

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "EngineError", "InputError", "InputWarning", "KmerTokenizer", "Model", "UntrainedModelWarning", "UtrError", "load", "verify",
           "__version__"]
