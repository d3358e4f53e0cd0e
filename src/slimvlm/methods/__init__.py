"""Built-in methods; importing this package registers them."""

from . import baselines, divprune, fastv, tome, visionzip  # noqa: F401
