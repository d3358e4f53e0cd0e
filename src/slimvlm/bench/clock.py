"""Where one generate() call's time goes: the vision stages, the prefill, the decode.

An evaluation harness sees only whole generate() calls; to say what a method saves it needs the split that
`slimvlm bench-vision` (stages 1-2) and `slimvlm bench-generate` (time to first token, decode) measure, read in
the same calls that produce the answers. The device is synchronised at each reading, so the split is exact
but the calls run a little slower than untimed ones on a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .timing import synchronize


@dataclass
class Split:
    """Seconds of one generate() call. vision: stages 1-2 (the vision tower with its stage-1 method, the
    projector, the stage-2 methods); prefill: from the call until the first new tokens reach the host, less
    vision; decode: the rest of the call."""

    vision: float
    prefill: float
    decode: float


class FirstTokens:
    """A generate() streamer noting when the first new tokens reach the host (time to first token): generate()
    puts the prompt first, then each step's tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.puts = 0
        self.at: float | None = None

    def put(self, _tokens) -> None:
        self.puts += 1
        if self.puts == 2:
            synchronize(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class GenerateClock:
    """Times generate() calls of a model slimvlm is applied to (`handle`), split into vision, prefill and
    decode. It wraps the runtime's stages 1-2 while it lives: call close() (or use it in a `with`)."""

    def __init__(self, handle) -> None:
        self.vision_stages = handle.runtime.vision
        self.device = next(handle.model.parameters()).device
        self._vision = 0.0
        run = self.vision_stages.run

        def timed_run(*args, **kwargs):
            synchronize(self.device)
            begin = time.perf_counter()
            visual = run(*args, **kwargs)
            synchronize(self.device)
            self._vision += time.perf_counter() - begin
            return visual

        self.vision_stages.run = timed_run

    def generate(self, model, **kwargs) -> tuple[torch.Tensor, Split]:
        """model.generate(**kwargs) and where its time went."""
        first = FirstTokens(self.device)
        self._vision = 0.0
        synchronize(self.device)
        begin = time.perf_counter()
        output = model.generate(**kwargs, streamer=first)
        synchronize(self.device)
        end = time.perf_counter()
        first_at = end if first.at is None else first.at  # no new token: the whole call was prefill
        return output, Split(vision=self._vision, prefill=first_at - begin - self._vision, decode=end - first_at)

    def close(self) -> None:
        """Leave the runtime's stages 1-2 as they were."""
        del self.vision_stages.run

    def __enter__(self) -> "GenerateClock":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
