"""slimvlm: spend fewer visual tokens in vision-language models, and measure what it saves."""

from .api import Handle, apply
from .errors import SlimVLMError
from .registry import PRESETS, methods
from .stages import Method, Stage
from .tokens import VisualTokens

__all__ = ["apply", "Handle", "methods", "PRESETS", "Method", "Stage", "VisualTokens", "SlimVLMError"]
__version__ = "0.1.0"
