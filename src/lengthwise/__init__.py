"""lengthwise: long-context methods for pretrained causal LMs, and honest measurements of them."""

from lengthwise.api import PatchHandle, bundled_models, load_model, patch
from lengthwise.registry import get_method, method_names

import lengthwise.methods  # noqa: E402, F401  (registers the built-in methods; any `import lengthwise.x` runs this first)
import lengthwise.scoring  # noqa: E402, F401  (registers the sliding-window baseline)

__version__ = "0.1.0"
__all__ = ["PatchHandle", "bundled_models", "get_method", "load_model", "method_names", "patch", "__version__"]
