"""The LLM's input after the image span is rebuilt: left-padded, each position text or visual.

One primitive, `compaction`, turns a keep mask into a left-padded gather index; rebuilding the
LLM input after stages 1-2 and dropping tokens inside the LLM at stage 3 both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import SlimVLMError
from .tokens import VisualTokens

IGNORE_INDEX = -100


class Packed(NamedTuple):
    """A keep mask packed into rows: gather with `index` (B, W); `valid` (B, W) marks real entries;
    `padded`: some row holds fewer than W (known on the host, so no later step needs to ask)."""

    index: torch.Tensor
    valid: torch.Tensor
    padded: bool


def kept_range(keep: torch.Tensor) -> torch.Tensor:
    """(2,) the fewest and the most entries a row of keep (B, L) holds: what compaction reads from the device,
    for callers that read several masks' at once (stack them, one .tolist())."""
    kept = keep.sum(dim=1)
    return torch.stack([kept.min(), kept.max()]) if keep.shape[0] else kept.new_zeros(2)


def compaction(keep: torch.Tensor, width_step: int = 1, right: bool = False,
               known: tuple[int, int] | None = None) -> Packed:
    """keep (B, L) bool -> gathering with the index packs each row's kept positions to the right end of a
    row of width W = most kept in a row (left padding; to the left end with `right` padding), in order,
    rounded up to a multiple of width_step (so that shapes repeat: CUDA graphs, compiled code). One read
    from the device (W), none when `known` gives kept_range(keep) already read."""
    batch, length = keep.shape
    fewest, most = known if known is not None else kept_range(keep).tolist()
    width = -(-most // width_step) * width_step
    kept = keep.sum(dim=1)
    pad = torch.zeros_like(kept) if right else width - kept
    slot = torch.where(keep, pad[:, None] + keep.long().cumsum(dim=1) - 1, width)  # dropped: a spare column
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, torch.arange(length, device=keep.device).expand(batch, -1))
    at = torch.arange(width, device=keep.device)[None, :]
    valid = at < kept[:, None] if right else at >= pad[:, None]
    return Packed(index[:, :width], valid, fewest < width)


def padding_of_causal_mask(mask: torch.Tensor, length: int, two_way: torch.Tensor | None = None) -> torch.Tensor:
    """The 2D padding mask (B, length) behind a 4D causal mask (B, 1, length, K >= length), bool
    (True = attend) or additive (0 = attend), such as generate() builds for a static cache: the last
    query sees every real key before it. two_way: (B, length, length) the (query, key) pairs the model's
    own mask also lets attend (Gemma 3's image blocks, both ways), where it has such. Any other 4D mask is
    refused: slimvlm rebuilds the mask of the reduced sequence from padding alone, and would drop what
    else the mask says."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != length or mask.shape[3] < length:
        raise SlimVLMError(
            f"a 4D attention_mask of shape {tuple(mask.shape)} is not the causal mask of a {length}-token prompt; "
            "pass the 2D padding mask (batch, sequence) the processor returns"
        )
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    padding = allowed[:, -1, :length]
    at = torch.arange(length, device=mask.device)
    pairs = (at[None, :] <= at[:, None])[None]
    if two_way is not None:
        pairs = pairs | two_way
    expected = padding[:, None, :] & pairs
    real_rows = padding[:, :, None]
    if not bool(((allowed[:, :, :length] == expected) | ~real_rows).all()) or bool(allowed[:, :, length:].any()):
        raise SlimVLMError(
            "the 4D attention_mask is not a causal mask over padding (slimvlm rebuilds the mask of the reduced "
            "sequence and cannot keep a custom pattern); pass the 2D padding mask the processor returns"
        )
    return padding.long()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) gathered along dim 1 by index (B, W)."""
    shape = index.shape + x.shape[2:]
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, expanded)


@dataclass
class Sequence:
    """Bookkeeping of a left-padded LLM sequence (B, L).

    valid: real tokens. positions: rotary position ids, (B, L), or (B, L, A) with one per rotary axis
    (M-RoPE: time, height, width). visual: visual tokens.
    image: which image (index into pixel_values) a visual token comes from, -1 for text.
    token: which of that image's VisualTokens it is (so stage-1 choices can be found again), -1 for text.
    """

    valid: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    image: torch.Tensor
    token: torch.Tensor

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "Sequence":
        return Sequence(
            valid=valid,
            positions=gather_rows(self.positions, index),
            visual=self.visual.gather(1, index) & valid,
            image=torch.where(valid, self.image.gather(1, index), -1),
            token=torch.where(valid, self.token.gather(1, index), -1),
        )

    def next_position(self) -> torch.Tensor:
        """The position of a token after the sequence, (B,), or (B, A) one per rotary axis: one past its last
        real token's, as generate() steps each axis on from the prompt's last column. On 1-D positions, which
        never decrease along a row, that is one past the largest; under M-RoPE it is not where a video's
        temporal positions run past the text after it (Qwen2-VL's get_rope_index starts that text past the
        video's height and width alone)."""
        at = torch.arange(self.valid.shape[1], device=self.valid.device)
        last = torch.where(self.valid, at, -1).argmax(dim=1)
        return self.positions[torch.arange(len(last), device=last.device), last] + 1

    def visual_counts(self) -> torch.Tensor:
        """(B,) visual tokens per sample."""
        return (self.visual & self.valid).sum(dim=1)

    def visual_runs(self) -> torch.Tensor:
        """(B, L): per sample the lengths of its runs of consecutive visual tokens in order, then zeros."""
        visual = (self.visual & self.valid).long()
        starts = visual.diff(dim=1, prepend=torch.zeros_like(visual[:, :1])).clamp(min=0)  # 1 where a run begins
        run = (starts.cumsum(dim=1) - 1).clamp(min=0)
        return torch.zeros_like(visual).scatter_add_(1, run, visual)


@dataclass
class Rebuilt:
    """What the LLM gets after stages 1-2: embeddings, 2D mask, position ids, labels; padded: some row is
    shorter than the widest (known on the host)."""

    embeds: torch.Tensor
    sequence: Sequence
    labels: torch.Tensor | None
    padded: bool


def is_placeholder(input_ids: torch.Tensor, placeholder_ids: tuple[int, ...]) -> torch.Tensor:
    """(B, L) bool: where input_ids hold a visual item's placeholder (an image's; a video's where the family
    reduces videos too)."""
    return torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))


def image_slots(input_ids: torch.Tensor, placeholder_ids: tuple[int, ...], num_images: int, tokens_per_image: int | list[int],
                found: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which image (visual item) and which slot of it each placeholder token is, in the order the processor
    wrote them. tokens_per_image: the placeholders of every image, or a list of each one's (LLaVA-NeXT: by
    image_sizes). found: the prompts' placeholders, where the caller has read them (else they are read)."""
    is_image = is_placeholder(input_ids, placeholder_ids)
    if found is None:
        found = int(is_image.sum().item())
    varying = isinstance(tokens_per_image, list)
    expected = sum(tokens_per_image) if varying else num_images * tokens_per_image
    if found == 0:
        raise SlimVLMError(
            f"the prompt has no image placeholder (token id {', '.join(map(str, placeholder_ids))}) but {num_images} "
            "image(s) were given; "
            "put '<image>' in the text where the image goes and build the inputs with the model's processor"
        )
    if found != expected:
        each = f"{', '.join(map(str, tokens_per_image))} by their image_sizes" if varying else f"{tokens_per_image} each"
        raise SlimVLMError(
            f"the prompt has {found} image placeholder tokens but {num_images} image(s) need {expected} "
            f"({each}); put one '<image>' per image in the text and let the processor expand it"
        )
    order = is_image.flatten().long().cumsum(0).view_as(input_ids) - 1
    if varying:
        counts = torch.tensor(tokens_per_image, device=input_ids.device)
        ends = counts.cumsum(0)
        which = torch.searchsorted(ends, order, right=True).clamp_max(len(tokens_per_image) - 1)
        return is_image, torch.where(is_image, which, -1), torch.where(is_image, order - (ends - counts)[which], -1)
    image = torch.where(is_image, order // tokens_per_image, -1)
    slot = torch.where(is_image, order % tokens_per_image, -1)
    return is_image, image, slot


def rebuild(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    tokens: VisualTokens,
    placeholder_ids: tuple[int, ...],
    tokens_per_image: int | list[int],
    keep_positions: bool,
    width_step: int = 1,
    right_padded: bool = False,
    placeholders: int | None = None,
    at_origin: bool = False,
) -> Rebuilt:
    """Replace each image's placeholder span with its (possibly fewer) visual tokens.

    position_ids: the untouched prompt's, (B, L) or (B, L, A) (one per rotary axis; kept positions only).
    keep_positions: each visual token keeps the position its origin's placeholder had (the first patch
    it covers), text keeps its own; otherwise positions are renumbered without gaps from the first
    token's position.
    width_step: the rebuilt rows' width is a multiple of it (more padding). right_padded: pad the
    rebuilt rows on the right, as the caller did (else on the left). placeholders: the prompts' placeholder
    tokens, where the caller has read them. at_origin: each token takes its origin's placeholder (origins
    counting an item's placeholders), not the next of its item's from the first: an item whose placeholders
    come in several runs (Qwen3-VL's video frames, timestamps between them) keeps each token in its own run.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    is_image, image, slot = image_slots(input_ids, placeholder_ids, tokens.batch_size, tokens_per_image, placeholders)
    places = tokens_per_image if isinstance(tokens_per_image, list) else [tokens_per_image] * tokens.batch_size
    for index, (count, room) in enumerate(zip(tokens.host_counts(), places)):
        if count > room:  # the span has no place for the rest: never drop them silently
            raise SlimVLMError(
                f"image {index} has {count} visual tokens after the methods but {room} placeholders in its prompt; "
                "a method may not give an image more tokens than it had: prune more (or shorten a DualSpeed isolator)"
            )
    safe_image, safe_slot = image.clamp_min(0), slot.clamp_min(0)
    if at_origin:
        spare = max(places)  # a column for padding tokens
        token_at = torch.full((tokens.batch_size, spare + 1), -1, dtype=torch.long, device=device)
        token_at.scatter_(1, torch.where(tokens.valid, tokens.origin, spare).clamp(0, spare),
                          torch.arange(tokens.x.shape[1], device=device).expand(tokens.batch_size, -1))
        token = token_at[:, :spare][safe_image, safe_slot.clamp_max(spare - 1)]
        in_budget = token >= 0
    else:
        token = slot
        in_budget = slot < tokens.counts[safe_image]
    keep = (~is_image) | in_budget
    if attention_mask is not None:
        keep &= attention_mask.bool()

    token = token.clamp(0, tokens.x.shape[1] - 1)
    visual_features = tokens.x[safe_image, token]
    use_visual = is_image & in_budget
    embeds = torch.where(use_visual[..., None], visual_features.to(text_embeds.dtype), text_embeds)

    if position_ids is None:
        position_ids = torch.arange(length, device=device)
    position_ids = position_ids.expand(batch, length, *position_ids.shape[2:])
    if keep_positions:
        origin = tokens.origin[safe_image, token]
        at = (torch.arange(length, device=device) - slot + origin).clamp(0, length - 1)  # the origin's placeholder
        kept = use_visual.view(*use_visual.shape, *([1] * (position_ids.dim() - 2)))
        positions = torch.where(kept, gather_rows(position_ids, at), position_ids)
    else:
        first = keep.long().argmax(dim=1, keepdim=True)
        positions = position_ids.gather(1, first) + keep.long().cumsum(dim=1) - 1

    index, valid, padded = compaction(keep, width_step, right=right_padded)
    full = Sequence(valid=keep, positions=positions, visual=use_visual, image=image, token=torch.where(use_visual, token, -1))
    sequence = full.gather(index, valid)
    new_labels = None
    if labels is not None:
        new_labels = torch.where(valid & ~sequence.visual, labels.gather(1, index), IGNORE_INDEX)
    return Rebuilt(embeds=gather_rows(embeds, index), sequence=sequence, labels=new_labels, padded=padded)


def attention_mask_4d(
    key_valid: torch.Tensor, query_length: int, dtype: torch.dtype | None, first_query: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(B, 1, Q, K) mask for Q queries at key slots first_query.. (default: the last Q of K keys):
    causal, padding masked, each query sees itself (so padding rows never attend to nothing); with a
    `window`, a query sees only the keys less than `window` slots before it, as transformers' sliding
    layers do (kv_idx > q_idx - window, on cache indices). dtype None gives a bool mask (True = attend,
    for SDPA); a float dtype gives an additive mask (for eager attention)."""
    keys = key_valid.shape[1]
    first = keys - query_length if first_query is None else first_query
    query_at = torch.arange(first, first + query_length, device=key_valid.device)[:, None]
    key_at = torch.arange(keys, device=key_valid.device)[None, :]
    seen = key_at <= query_at
    if window is not None:
        seen &= key_at > query_at - window
    allowed = seen[None] & key_valid[:, None, :]
    allowed |= (key_at == query_at)[None]
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
