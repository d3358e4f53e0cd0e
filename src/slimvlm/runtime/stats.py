"""What the last forward did (Stats): kept on the device during the forward, read in one transfer when asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..device_reads import read_together
from .session import Session, View


@dataclass
class Stats:
    """What the last forward/generate did.

    visual_tokens: per image, tokens that reached the LLM. sources: per image, for each patch
    (raster order) the visual token it ended in, -1 if dropped (the source map; LLaVA-NeXT: for each
    slot of the image's layout, models/anyres.py; Qwen2-VL: for each 2 x 2 unit; -1 past an image's own;
    Qwen2-VL's, LLaVA-NeXT-Video's and LLaVA-OneVision's images and videos are items in prompt order, each an "image" here; a
    LLaVA-NeXT-Video or LLaVA-OneVision video's slots are its frames' pooled tokens, then OneVision's newline, models/video.py).
    kv_entries / kv_visual_entries: per sample, per LLM layer, cache entries after prefill (all /
    visual). vision_tokens: per vision layer run, per encoder view (an image; LLaVA-NeXT: each crop;
    LLaVA-NeXT-Video: each crop and each video frame;
    Qwen2-VL: each attention segment, an image or video frame or in 2.5's windowed blocks a window, 0 past a
    layer's last), tokens at its input. llm_tokens: per LLM layer, per sample, tokens in prefill. attention_tokens:
    the same for the tokens each layer's attention runs over (more than llm_tokens under virtual
    unmerging). projector_tokens: per encoder view, tokens through the projector. prompt_tokens: per
    sample, the untouched prompt's length.
    fusion_tokens: per stage-2 fusion layer (LLaVA-Mini's pre-fusion: layers of the LM's shape run
    before the LLM), per sample, the tokens it ran over. two_way_runs: per LLM layer, per sample, the lengths of the
    runs of visual tokens that attend to each other both ways in prefill (Gemma 3 given token_type_ids; empty where
    the LM's masks are causal).
    """

    visual_tokens: list[int] = field(default_factory=list)
    sources: list[list[int]] = field(default_factory=list)
    kv_entries: list[list[int]] = field(default_factory=list)
    kv_visual_entries: list[list[int]] = field(default_factory=list)
    vision_tokens: list[list[int]] = field(default_factory=list)
    llm_tokens: list[list[int]] = field(default_factory=list)
    attention_tokens: list[list[int]] = field(default_factory=list)
    projector_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    fusion_tokens: list[list[int]] = field(default_factory=list)
    two_way_runs: list[list[list[int]]] = field(default_factory=list)


def per_view(views: list[View], count: Callable[[View], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """`count(view)` (a (B,) or (B, L) tensor) for each distinct view, stacked (V, B) or (V, B, widest L, zeros
    after a view's own), and per layer the row of its view: computed once per view, as layers share views."""
    distinct = {id(view): (row, view) for row, view in enumerate({id(v): v for v in views}.values())}
    counts = [count(view) for _, view in distinct.values()]
    if counts[0].dim() == 2:
        widest = max(c.shape[1] for c in counts)
        counts = [torch.nn.functional.pad(c, (0, widest - c.shape[1])) for c in counts]
    return torch.stack(counts), [distinct[id(view)][0] for view in views]


def tokens_per_layer(session: Session) -> tuple[torch.Tensor, list[int]]:
    """Per LLM layer (through per_view), the tokens per sample its view of the sequence holds."""
    return per_view(session.layer_views, lambda view: view.sequence.valid.sum(dim=1))


def recorded(session: Session, tokens, vision_trace, projected: list[int] | torch.Tensor,
             prefill_tokens: tuple[torch.Tensor, list[int]], prompt_length: int,
             fusion: list[list[int]], two_way: bool = False) -> Callable[[], Stats]:
    """Keep on the device what the statistics need (the views change at the next prefill); the function
    returned reads it in one transfer when the statistics are asked for. two_way: the LM's prefill masks let each run
    of visual tokens attend to itself both ways (then its runs are kept too)."""
    entries = tokens_per_layer(session)
    runs = per_view(session.layer_views, lambda view: view.sequence.visual_runs()) if two_way else None
    visual = per_view(session.layer_views, lambda v: v.sequence.visual_counts())
    copies = session.copies.valid.sum(dim=1) if session.copies is not None else None
    counts = tokens.counts if tokens.known is None else None
    known = tokens.known
    device = tokens.x.device
    trace = torch.stack(vision_trace).to(device) if vision_trace else torch.zeros(0, 0, dtype=torch.long, device=device)
    parts = [tokens.patch_to_token.clone(), trace, prefill_tokens[0], entries[0], visual[0]]  # clone: a graph reuses its outputs
    projected_on_device = projected.clone() if isinstance(projected, torch.Tensor) else None
    parts += [t for t in (counts, projected_on_device, copies, runs[0] if runs else None) if t is not None]

    def read() -> Stats:
        sources, vision, llm, kv, kv_visual, *rest = read_together(parts)
        visual_tokens = rest.pop(0) if counts is not None else list(known)
        projector_tokens = rest.pop(0) if projected_on_device is not None else projected
        per_layer = [llm[row] for row in prefill_tokens[1]]
        attention = [rest.pop(0)] * len(per_layer) if copies is not None else per_layer
        two_way_runs = [] if runs is None else [[[b for b in sample if b] for sample in rest[0][row]] for row in runs[1]]
        return Stats(
            visual_tokens=visual_tokens,
            sources=sources,
            kv_entries=[list(sample) for sample in zip(*(kv[row] for row in entries[1]))],
            kv_visual_entries=[list(sample) for sample in zip(*(kv_visual[row] for row in visual[1]))],
            vision_tokens=vision,
            llm_tokens=per_layer,
            attention_tokens=attention,
            projector_tokens=projector_tokens,
            prompt_tokens=[prompt_length] * len(per_layer[0]),
            fusion_tokens=fusion,
            two_way_runs=two_way_runs,
        )

    return read
