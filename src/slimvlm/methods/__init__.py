"""Built-in methods; importing this package registers them."""

from . import baselines, divprune, dymu, fastv, llava_mini, mustdrop, tome, visionzip, vtu  # noqa: F401
