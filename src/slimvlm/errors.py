"""The one exception slimvlm raises for bad input: its message names the problem and the fix."""


class SlimVLMError(ValueError):
    """Bad input to slimvlm (unknown method, option out of range, unsupported model...)."""
