"""Runs a model with methods installed: the wrapped forward, the prefill and decode bookkeeping.

Data flows one way: pixels -> stage 1 (encoder) -> stage 2 (projected tokens) -> the LLM input is
rebuilt (embeddings, mask, positions) -> stage 3 (LLM layers in prefill) -> decode steps whose
masks and positions continue the reduced sequence. generate() needs no change: its own
bookkeeping stays in the frame of the original prompt, and each forward maps it to ours.

The rooms, in the order a call meets them:
  core.py            Runtime: installs the wrapped forward, routes each call, runs a prefill's steps in order
  plan.py            which path a call takes (prefill, cache, decode, layer hooks), decided once at its start
  prompt.py          the caller's prompt: what is refused, images per sample, the padding side
  vision.py          stages 1-2: the visual tokens the LLM gets, one CUDA graph where it can
  session.py         one prompt's state from prefill through decoding, and the layers' views of its sequence
  prefill.py         the LLM over the rebuilt prompt by the plan's path, up to the cache decoding continues on
  prefill_layers.py  stages 3-4 in the LLM: drops, the attention rows they read, cache cuts, the layer hooks
  segments.py        the batch-1 prefill in segments between drops, replayed from CUDA graphs
  static_cache.py    slimvlm's static cache: its prefill and compiled decode steps
  decode.py          a decode step's bookkeeping and its path
  decode_step.py     one decode step as a function of tensors (what torch.compile sees)
  unmerge.py         virtual token unmerging (VTU): the copies and the attention over them
  outputs.py         the untouched model's output class
  stats.py           Stats: kept on the device, read when asked for
"""

from .core import Runtime
from .stats import Stats

__all__ = ["Runtime", "Stats"]
