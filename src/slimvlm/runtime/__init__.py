"""Runs a model with methods installed: the wrapped forward, the prefill and decode bookkeeping.

Data flows one way: pixels -> stage 1 (encoder) -> stage 2 (projected tokens) -> the LLM input is
rebuilt (embeddings, mask, positions) -> stage 3 (LLM layers in prefill) -> decode steps whose
masks and positions continue the reduced sequence. generate() needs no change: its own
bookkeeping stays in the frame of the original prompt, and each forward maps it to ours.
"""

from .core import Runtime
from .stats import Stats

__all__ = ["Runtime", "Stats"]
