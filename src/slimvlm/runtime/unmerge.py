"""Virtual token unmerging (VTU, from DyMU: Wang et al., arXiv 2504.17040): the attention of LLM layers as if
the merged tokens were unmerged, a runtime mode that methods ask for (Method.virtual_unmerge).

After merging in the encoder, an LLM that was trained on the full sequence sees fewer tokens than
it expects. VTU lets each attention layer behave as if the full sequence were there: every merged
token stands for the patches it covers, so its query and key are used once per covered patch,
each rotated to that patch's own position. RoPE is a rotation, R_p x = cos(p theta) x +
sin(p theta) rot(x), and rotations compose (R_{p-p0} R_{p0} = R_p), so the copies come from the
merged token's already rotated q/k by one more rotation of (p - p0). Softmax runs over every key
copy (exactly the full sequence's normalisation), and each merged token's output is the mean of
its copies' outputs. Projections, MLPs and the KV cache stay at the merged length; the attention
itself costs what the full sequence's does.

The runtime installs UnmergeCore in every LLM layer's attention (models/adapter.py override_attention); the
session holds the copies of its prompt (unmerged_copies) and grows them with each decode step (append_tokens) on
the dynamic cache; on slimvlm's static cache it holds them in one shape for the whole call (StaticCopies), which
the compiled decode step hands every layer.

The identity that defines it (tested): on the merged sequence, a VTU attention layer gives the
mean over copies of the ordinary attention layer run on the explicitly unmerged sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..attention import apply_rope
from ..sequence import Sequence
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
        return apply_rope(self.pick(x), self.cos.to(x.dtype), self.sin.to(x.dtype))

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L, d) in the merged frame -> its copies (B, H, N, d), unrotated (the values)."""
        heads, dim = x.shape[1], x.shape[3]
        return x.gather(2, self.source[:, None, :, None].expand(-1, heads, -1, dim))


def unmerged_copies(sequence: Sequence, tokens: VisualTokens) -> Copies:
    """Copies of the merged LLM sequence that make up the full one. Needs the positions that
    slimvlm keeps in `keep_positions` mode: a visual token sits at its first patch's position.
    A visual token covering no patch (a class token) stays one copy."""
    batch, length = sequence.valid.shape
    device = sequence.valid.device
    real = sequence.valid
    visual = sequence.visual & real
    # where each (image, token) sits in the sequence, and in which sample
    rows, cols = visual.nonzero(as_tuple=True)
    images, token_ids = sequence.image[rows, cols], sequence.token[rows, cols]
    where = torch.full(tokens.origin.shape, -1, dtype=torch.long, device=device)
    where[images, token_ids] = rows * length + cols
    # one copy per kept patch, at the patch's own position
    image_of_patch, patch = (tokens.patch_to_token >= 0).nonzero(as_tuple=True)
    token_of_patch = tokens.patch_to_token[image_of_patch, patch]
    flat = where[image_of_patch, token_of_patch]
    patch_rotation = patch - tokens.origin[image_of_patch, token_of_patch]
    # one copy, unrotated, for text and for visual tokens that cover no patch
    covered = torch.zeros_like(real)
    covered.view(-1)[flat] = True
    single = real & ~covered
    single_flat = single.view(-1).nonzero().squeeze(1)
    flat = torch.cat([flat, single_flat])
    rotation = torch.cat([patch_rotation, torch.zeros_like(single_flat)])
    sample, source = flat // length, flat % length
    position = sequence.positions[sample, source] + rotation
    # per sample, in order of position; left-aligned rows padded at the end
    order = (sample * (position.max() + 1) + position).argsort(stable=True)
    sample, source, rotation, position = sample[order], source[order], rotation[order], position[order]
    counts = torch.bincount(sample, minlength=batch)
    width = int(counts.max())
    column = torch.arange(len(sample), device=device) - (counts.cumsum(0) - counts)[sample]
    copies = Copies(
        source=torch.zeros(batch, width, dtype=torch.long, device=device),
        rotation=torch.zeros(batch, width, dtype=torch.long, device=device),
        position=torch.full((batch, width), torch.iinfo(torch.long).max, dtype=torch.long, device=device),
        valid=torch.zeros(batch, width, dtype=torch.bool, device=device),
    )
    copies.source[sample, column] = source
    copies.rotation[sample, column] = rotation
    copies.position[sample, column] = position
    copies.valid[sample, column] = True
    return copies


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


def _with_rotary(adapter, copies: Copies, like: torch.Tensor) -> Copies:
    """`copies` with the cos/sin of their rotations, computed once per forward for every layer."""
    copies.cos, copies.sin = adapter.rotary(like, copies.rotation)
    return copies


def prompt_copies(adapter, sequence: Sequence, tokens: VisualTokens, like: torch.Tensor) -> Copies:
    """The copies of a rebuilt prompt (its keys' and its queries' in prefill)."""
    return _with_rotary(adapter, unmerged_copies(sequence, tokens), like)


def step_copies(adapter, copies: Copies, first: int, positions: torch.Tensor, valid: torch.Tensor,
                like: torch.Tensor) -> tuple[Copies, Copies]:
    """(the keys' copies after a decode step of tokens at merged positions first.. and true `positions` (B, Q),
    the step's queries as copies: one each, unrotated)."""
    steps = positions.shape[1]
    keys = _with_rotary(adapter, append_tokens(copies, first, steps, positions, valid), like)
    queries = Copies(torch.arange(steps, device=positions.device).expand_as(positions), torch.zeros_like(positions),
                     positions, valid)
    return keys, _with_rotary(adapter, queries, like)


@dataclass
class StaticCopies:
    """VTU's key copies on slimvlm's static cache, of one shape for a whole generate() call so that the compiled
    decode step keeps it: the prompt's copies, then one column per decode slot of the cache (its source that slot,
    unrotated, at the position the token decoded there will have), padded to a multiple of `step` columns so that
    prompts of nearby lengths share a compiled step. `slots` (B, C) is the static cache's slot validity, which each
    step's bookkeeping updates in place: a column is a key once its slot holds an entry."""

    keys: Copies
    slots: torch.Tensor
    query_cos: torch.Tensor  # (B, 1, d): a decode step's query, one copy, unrotated
    query_sin: torch.Tensor

    def step(self, position_ids: torch.Tensor) -> tuple[Copies, Copies]:
        """(the step's queries as copies, the keys' copies valid so far) for queries at `position_ids` (B, Q)."""
        queries = Copies(torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids),
                         torch.zeros_like(position_ids), position_ids, torch.ones_like(position_ids, dtype=torch.bool),
                         self.query_cos.expand(-1, position_ids.shape[1], -1),
                         self.query_sin.expand(-1, position_ids.shape[1], -1))
        keys = self.keys
        valid = keys.valid & self.slots.gather(1, keys.source)
        return queries, Copies(keys.source, keys.rotation, keys.position, valid, keys.cos, keys.sin)


def static_copies(adapter, prompt: Copies, slots: torch.Tensor, first_slot: int, next_position: torch.Tensor,
                  like: torch.Tensor, step: int) -> StaticCopies:
    """StaticCopies of a prompt whose copies are `prompt`, decoding into the static cache's `slots` from
    `first_slot` on, its first new token at `next_position` (B,)."""
    batch, device = slots.shape[0], slots.device
    room = slots.shape[1] - first_slot
    width = -(-(prompt.source.shape[1] + room) // step) * step
    pad = width - prompt.source.shape[1] - room
    ahead = torch.arange(room, device=device).expand(batch, room)

    def columns(prompt_part, new_part, pad_value):
        return torch.cat([prompt_part, new_part, prompt_part.new_full((batch, pad), pad_value)], dim=1)

    keys = Copies(
        source=columns(prompt.source, first_slot + ahead, 0),
        rotation=columns(prompt.rotation, torch.zeros_like(ahead), 0),
        position=columns(prompt.position, next_position[:, None] + ahead, torch.iinfo(torch.long).max),
        valid=columns(prompt.valid, torch.ones_like(ahead, dtype=torch.bool), False),
    )
    _with_rotary(adapter, keys, like)
    query_cos, query_sin = adapter.rotary(like, torch.zeros(batch, 1, dtype=torch.long, device=device))
    return StaticCopies(keys, slots, query_cos, query_sin)


class Serving(Protocol):
    """What the attention core reads of the session being served (runtime/session.py)."""

    copies: Copies | None  # the keys' copies: the prompt's and each decoded token's
    query_copies: Copies | None  # this forward's queries' copies


STATIC_COPIES = "static_copies"  # the keyword the static decode step hands every layer its StaticCopies by


class UnmergeCore:
    """The attention core the adapter runs in every LLM layer while virtual unmerging is on
    (models/adapter.py override_attention): on the copies a static decode step hands the layer (a tensor
    argument of the compiled step), else on those of the session being served, if it holds any."""

    def __init__(self, session: Callable[[], Serving | None]) -> None:
        self.session = session

    def prepare(self, kwargs: dict) -> tuple[Copies, Copies] | None:
        """(query copies, key copies) of this layer call, or None: the layer runs as the model's."""
        static = kwargs.pop(STATIC_COPIES, None)
        if static is not None:
            return static.step(kwargs["position_ids"])
        session = self.session()
        if session is None or session.copies is None:
            return None
        return session.query_copies, session.copies

    def __call__(self, module, queries, keys, values, copies: tuple[Copies, Copies]) -> torch.Tensor:
        return virtual_unmerge_attention(module, queries, keys, values, *copies)
