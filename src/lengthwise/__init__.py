"""lengthwise: long-context methods for pretrained causal LMs, and honest measurements of them."""

from lengthwise.api import PatchHandle, bundled_models, load_model, patch
from lengthwise.registry import get_method, method_names

__version__ = "0.1.0"
__all__ = ["PatchHandle", "bundled_models", "get_method", "load_model", "method_names", "patch", "__version__"]
