"""One prompt's state from its prefill through its decode steps, and the views LLM layers have of its sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sequence import Sequence
from .plan import Plan
from .static_cache import StaticSteps
from .unmerge import Copies, StaticCopies


@dataclass
class View:
    """The sequence as some LLM layers see it: stage 3 shortens it for the layers after a drop,
    stage 4 for the cache of a layer. Layers that share a view share one mask per step."""

    sequence: Sequence
    key_valid: torch.Tensor  # (B, K): the cache entries these layers hold, valid or padding
    position_embeddings: tuple | None = None
    prefill_mask: torch.Tensor | None = None  # the hooked prefill's, set after a drop
    decode_mask: torch.Tensor | None = None
    padded: bool = True  # some row holds fewer entries than the widest (known on the host when the view was cut)


@dataclass
class Session:
    """One prompt's state from prefill through its decode steps."""

    plan: Plan  # its prefill's; each decode step follows it (Plan.step)
    cache: object
    prompt_length: int
    next_position: torch.Tensor
    conversation: torch.Tensor  # (B, prompt + decoded) the token ids the cache holds, in the caller's frame
    layer_views: list[View]
    tokens: object = None  # the VisualTokens that entered the LLM
    given_cache: object = None  # the cache the caller passed in, where slimvlm swapped in one of its own
    static: StaticSteps | None = None  # decoding on slimvlm's static cache
    padded: bool = True  # whether the reduced prompt has padding (then every step needs a mask)
    decoded: int = 0  # tokens decoded so far
    labels: torch.Tensor | None = None  # the prefill's labels in the frame of its current sequence
    right_padded: bool = False  # the caller pads on the right: rows stay packed to the left
    copies: Copies | None = None  # virtual unmerging: the full sequence's keys as copies
    query_copies: Copies | None = None
    static_copies: StaticCopies | None = None  # the keys' copies in one shape, on slimvlm's static cache
    rows: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)  # per kind of query rows: (the sequence they index, index, valid)
    mask_inputs: dict = field(default_factory=dict)  # what of the prefill call the LM's masks follow (adapter.mask_inputs)

    def view_of(self, layer: int) -> View:
        return self.layer_views[layer]

    def is_base(self, layer: int) -> bool:
        """Layers that see what layer 0 sees get transformers' own mask, made from our 2D mask."""
        return self.layer_views[layer] is self.layer_views[0]

    def distinct_views(self) -> list[View]:
        return list({id(view): view for view in self.layer_views}.values())

    def set_view(self, layers: range | list[int], view: View) -> None:
        for layer in layers:
            self.layer_views[layer] = view
