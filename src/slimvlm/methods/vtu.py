"""Virtual token unmerging (VTU, from DyMU: Wang et al., arXiv 2504.17040), stage 3.

After merging in the encoder, an LLM that was trained on the full sequence sees fewer tokens than
it expects. VTU lets each attention layer behave as if the full sequence were there: every merged
token stands for the patches it covers, so its query and key are used once per covered patch,
each rotated to that patch's own position. RoPE is a rotation, R_p x = cos(p theta) x +
sin(p theta) rot(x), and rotations compose (R_{p-p0} R_{p0} = R_p), so the copies come from the
merged token's already rotated q/k by one more rotation of (p - p0). Softmax runs over every key
copy (exactly the full sequence's normalisation), and each merged token's output is the mean of
its copies' outputs. Projections, MLPs and the KV cache stay at the merged length; the attention
itself costs what the full sequence's does.

The identity that defines it (tested): on the merged sequence, a VTU attention layer gives the
mean over copies of the ordinary attention layer run on the explicitly unmerged sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import apply_rope
from ..registry import register
from ..sequence import Sequence
from ..stages import Method, Stage
from ..tokens import VisualTokens


@dataclass
class Copies:
    """The unmerged sequence, per sample, as copies of merged positions (left-aligned, padded).

    source: (B, N) merged position each copy reads; rotation: (B, N) extra rotary angle index
    (true position - merged position); position: (B, N) true position; valid: (B, N).
    cos/sin: (B, N, d) of `rotation`, computed once per forward and shared by every layer."""

    source: torch.Tensor
    rotation: torch.Tensor
    position: torch.Tensor
    valid: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L, d) in the merged frame -> its copies (B, H, N, d), each at its true position."""
        heads, dim = x.shape[1], x.shape[3]
        picked = x.gather(2, self.source[:, None, :, None].expand(-1, heads, -1, dim))
        return apply_rope(picked, self.cos.to(x.dtype), self.sin.to(x.dtype))

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        heads, dim = x.shape[1], x.shape[3]
        return x.gather(2, self.source[:, None, :, None].expand(-1, heads, -1, dim))


def unmerged_copies(sequence: Sequence, tokens: VisualTokens) -> Copies:
    """Copies of the merged LLM sequence that make up the full one. Needs the positions that
    slimvlm keeps in `keep_positions` mode: a visual token sits at its first patch's position."""
    batch, length = sequence.valid.shape
    device = sequence.valid.device
    rows = []
    for b in range(batch):
        source, rotation = [], []
        for i in range(length):
            if not sequence.valid[b, i]:
                continue
            if not sequence.visual[b, i]:
                source.append(torch.tensor([i], device=device))
                rotation.append(torch.zeros(1, dtype=torch.long, device=device))
                continue
            image, token = int(sequence.image[b, i]), int(sequence.token[b, i])
            patches = (tokens.patch_to_token[image] == token).nonzero().squeeze(1)
            if len(patches) == 0:  # a token that covers no patch (the class token) stays one token
                patches = tokens.origin[image, token].view(1)
            source.append(torch.full_like(patches, i))
            rotation.append(patches - tokens.origin[image, token])
        source, rotation = torch.cat(source), torch.cat(rotation)
        position = sequence.positions[b, source] + rotation
        order = position.argsort(stable=True)
        rows.append((source[order], rotation[order], position[order]))
    width = max(len(r[0]) for r in rows)

    def pad(values: list[torch.Tensor], fill: int) -> torch.Tensor:
        return torch.stack([F.pad(v, (0, width - len(v)), value=fill) for v in values])

    return Copies(
        source=pad([r[0] for r in rows], 0),
        rotation=pad([r[1] for r in rows], 0),
        position=pad([r[2] for r in rows], torch.iinfo(torch.long).max),
        valid=pad([torch.ones_like(r[0], dtype=torch.bool) for r in rows], 0).bool(),
    )


def append_tokens(copies: Copies, first: int, steps: int, positions: torch.Tensor, valid: torch.Tensor) -> Copies:
    """The copies after `steps` new (text) tokens at merged positions first.. and true `positions`."""
    batch = positions.shape[0]
    new_source = (first + torch.arange(steps, device=positions.device)).expand(batch, steps)
    zeros = torch.zeros_like(new_source)
    return Copies(
        source=torch.cat([copies.source, new_source], dim=1),
        rotation=torch.cat([copies.rotation, zeros], dim=1),
        position=torch.cat([copies.position, positions], dim=1),
        valid=torch.cat([copies.valid, valid], dim=1),
    )


def virtual_unmerge_attention(module, queries, keys, values, query_copies: Copies, key_copies: Copies) -> torch.Tensor:
    """Attention of the unmerged sequence, re-merged: queries (B, H, Lq, d), keys/values
    (B, H_kv, Lk, d) in the merged frame (RoPE at merged positions). Returns (B, Lq, H, d)."""
    q = query_copies.rotate(queries)
    k = key_copies.rotate(keys)
    v = key_copies.pick(values)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    allowed = key_copies.valid[:, None, :] & (key_copies.position[:, None, :] <= query_copies.position[:, :, None])
    allowed |= ~query_copies.valid[:, :, None]  # padding rows attend to everything; they are dropped below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=module.scaling)
    # re-merge: mean over each merged query's copies (padding copies go to a spare slot)
    batch, heads, length, dim = queries.shape
    target = torch.where(query_copies.valid, query_copies.source, length)
    summed = out.new_zeros(batch, heads, length + 1, dim)
    summed.scatter_add_(2, target[:, None, :, None].expand(-1, heads, -1, dim), out)
    count = torch.zeros(batch, length + 1, device=out.device, dtype=out.dtype)
    count.scatter_add_(1, target, torch.ones_like(target, dtype=out.dtype))
    merged = summed[:, :, :length] / count[:, None, :length, None].clamp_min(1)
    return merged.transpose(1, 2)


@register
class VirtualUnmerge(Method):
    name = "vtu"
    description = "virtual token unmerging: LLM attention as if merged tokens were unmerged, via RoPE (DyMU)"
    stages = frozenset({Stage.PREFILL})
    virtual_unmerge = True
