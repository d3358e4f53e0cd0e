"""slimvlm: spend fewer visual tokens in vision-language models, and measure what it saves."""

from . import methods as _builtin_methods  # noqa: F401  registers the built-in methods first, so that
from .api import Handle, apply  # `slimvlm.methods` below is the listing function, not the subpackage
from .errors import SlimVLMError
from .registry import PRESETS, methods
from .method import Method, Stage
from .tokens import VisualTokens

__all__ = ["apply", "Handle", "methods", "PRESETS", "Method", "Stage", "VisualTokens", "SlimVLMError"]
__version__ = "0.1.0"
