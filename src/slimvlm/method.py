"""The method protocol: the five stages where visual tokens cost, and the hooks a method implements.

A method names the stages it acts at and overrides the hooks of those stages; the model's
adapter calls them at the right place. Hooks receive and return plain tensors and
VisualTokens, never model modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from .errors import SlimVLMError
from .sequence import Sequence, compaction
from .tokens import VisualTokens

if TYPE_CHECKING:
    from .models.adapter import LanguageModelAdapter

# what a budget rule gives: a spec, a composition of specs, or None where the method cannot be set to a budget
BudgetSpec = str | list[str] | None


class Stage(IntEnum):
    ENCODE = 1  # inside the vision encoder's layers
    PROJECT = 2  # between the encoder/projector and the LLM
    PREFILL = 3  # inside the LLM layers during prefill
    DECODE = 4  # the KV cache during generation
    TRAIN = 5  # the training loop


@dataclass
class EncoderAttention:
    """One vision-encoder layer's attention, as a stage-1 hook sees it.

    keys: (B, H, N, d) keys of the layer's input tokens. rows(query_index (B, Q)) gives the
    attention probabilities (B, H, Q, N) of those queries, as eager attention would compute them.
    """

    layer: int
    num_layers: int
    keys: torch.Tensor
    rows: Callable[[torch.Tensor], torch.Tensor]
    # at the encoder output only: the same rows from the next encoder layer (which LLaVA does not
    # run), for methods whose paper reads the last layer's attention; None if there is none
    next_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (B, N) the attention each token receives, where the family gives it itself (Qwen-VL: a merged token's,
    # from its patches'; models/qwen2_vl.py); None elsewhere (methods derive it from rows)
    received: torch.Tensor | None = None
    # the LLM keeps each visual token at its own position (Qwen-VL's M-RoPE): a token a method makes sits at
    # the place and position of one of its members, not after the others
    positions_kept: bool = False
    # stages 1-2 run inside a CUDA graph: a method whose counts follow the image keeps the token tensor's width
    # (what it merges or drops becomes padding) rather than read its counts back to the host
    keep_width: bool = False


def no_rows(_query_index: torch.Tensor) -> torch.Tensor:
    """EncoderAttention.rows of tokens a tower's merge made (Qwen-VL's merger, InternVL's pixel shuffle): they have
    no attention rows of their own."""
    raise SlimVLMError("merged tokens have no attention rows of their own; read EncoderAttention.received")


@dataclass
class PromptContext:
    """What stage-2 methods may read besides the visual tokens: the prompts.

    input_ids, attention_mask: (B, L) as given; text_embeds: (B, L, D) their embeddings (image
    placeholders included); image_of_sample: per sample, the indices of its images in the batch;
    labels: the forward's labels (B, L) when training (-100 where no loss is taken), else None,
    so that training-time fusion can leave the answer tokens out (LLaVA-Mini).
    """

    input_ids: torch.Tensor | None  # None where stages 1-2 replay from a CUDA graph (capturable methods read none)
    attention_mask: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_of_sample: list[list[int]] = field(default_factory=list)
    labels: torch.Tensor | None = None


@dataclass
class PrefillLayer:
    """An LLM layer during prefill, as a stage-3 hook sees it.

    sequence: bookkeeping of the current (possibly already reduced) sequence, (B, L).
    hidden: (B, L, D) the layer's input hidden states.
    rows: (B, H, Q, L) attention probabilities that the method asked for at its score layer
    (queries given by `query_index`, valid where `query_valid`); None if it asked for none.
    """

    layer: int
    sequence: Sequence
    hidden: torch.Tensor
    rows: torch.Tensor | None
    query_index: torch.Tensor | None
    query_valid: torch.Tensor | None
    tokens: VisualTokens | None = None  # the visual tokens that entered the LLM (sequence.image/.token index them)


QUERIES = ("last", "text", "text_after_image")


def query_index(sequence: Sequence, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows a method asks for: 'last' (the last token, which predicts the answer),
    'text' (every text token) or 'text_after_image' (the text after the last visual token: the
    question). Returns (index (B, Q), valid (B, Q))."""
    batch, length = sequence.valid.shape
    device = sequence.valid.device
    text = sequence.valid & ~sequence.visual
    if which == "last":  # the last real token: the last column when rows are padded on the left
        at = torch.arange(length, device=device)
        last = torch.where(sequence.valid, at, -1).max(dim=1, keepdim=True).values
        return last, torch.ones(batch, 1, dtype=torch.bool, device=device)
    if which == "text":
        return compaction(text)[:2]
    if which == "text_after_image":
        at = torch.arange(length, device=device)
        last_visual = torch.where(sequence.visual, at, -1).max(dim=1, keepdim=True).values
        return compaction(text & (at > last_visual))[:2]
    raise SlimVLMError(f"unknown query rows {which!r}; use one of {QUERIES}")


class Method:
    """Base class: a token-reduction method. Subclasses set the class attributes and override the
    hooks of their stages; options are keyword arguments of __init__ (validated there)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stages: ClassVar[frozenset[Stage]] = frozenset()
    # stage 1: add log(size) to the encoder's attention logits (ToMe's proportional attention)
    proportional_attention: ClassVar[bool] = False
    # stage 1: the class token goes on to the LLM even where the model's feature selection drops it
    feeds_cls: ClassVar[bool] = False
    # stages 1-2: the hooks are pure functions of their inputs that read nothing back to the host and
    # whose shapes follow from host-known counts (VisualTokens.known), or from the token tensor's width where
    # EncoderAttention.keep_width asks, so the vision tower, the method and the projector can replay together
    # from one CUDA graph (graphs.py)
    capturable: ClassVar[bool] = False
    # stages 1-2: attributes the hooks set for later stages; a CUDA graph's replay runs no Python, so the
    # runtime sets them again from what the captured run left (the replay refreshes those tensors)
    encoder_state: ClassVar[tuple[str, ...]] = ()
    # stage 1: encode_layer acts after every encoder layer; False for methods that read only the feature
    # layer (encode_output), so that the layers before it run untouched (and can replay as a CUDA graph)
    acts_in_encoder_layers: ClassVar[bool] = True
    # stage 1: encode_output also acts on a tower's merged outputs (Qwen-VL's 2 x 2 merger) given each merged
    # token's keys and received attention (EncoderAttention.received), with no attention rows
    at_merged_tokens: ClassVar[bool] = False
    # stage 3: virtual token unmerging (runtime/unmerge.py): every LLM layer's attention runs over the merged tokens'
    # copies, one per patch each covers, as if a stage-1 merge had not happened; a runtime mode the method asks for
    virtual_unmerge: ClassVar[bool] = False
    # stage 4: every layer whose cache decode_keep cuts keeps the same entries of the prompt (one set of tokens,
    # whatever sequence the layer saw in prefill): those layers then share one cache view, one mask per step
    cache_keeps_one_set: ClassVar[bool] = False
    # stage 1: the encoder's sequence lengths follow each image (threshold merging), so they are new
    # on most calls; the encoder then runs attention off cuDNN (see LlavaAdapter.encode)
    varying_lengths: bool = False
    # stage 2: works on each image's tokens as one patch grid (2D pooling, 2D positions), which models whose
    # images are several views (LLaVA-NeXT's base view and tiles, with newlines) do not have
    needs_patch_grid: ClassVar[bool] = False
    # stage 2: its own modules are laid out on the vision config's patch grid (image_size / patch_size), one
    # projected token per patch, which a tower that joins patches before the LLM (InternVL's pixel shuffle) breaks
    grid_from_vision_config: ClassVar[bool] = False
    # stage 3: the LLM layers at whose input it drops tokens; it reads the attention rows
    # (`queries`) of the layer before each
    drop_layers: tuple[int, ...] = ()
    queries: str | None = None

    def options(self) -> dict:
        """The options this instance was built with (for reports)."""
        return dict(self._options) if hasattr(self, "_options") else {}

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        """The budget rule: the spec (or composition) that leaves about `budget` visual tokens per image on
        the adapter's model, so that the demo compares every method at the same budgets; None where the
        method cannot be set to a budget here (it needs weights or a calibration the model folder lacks).
        `context`: what the caller knows beyond the model (`targets`: the DyMU calibrations it ships).
        A method states its own rule: without one it is refused, not silently left out."""
        raise NotImplementedError(f"method {cls.name!r} has no budget rule; override {cls.__name__}.spec_for_budget")

    # stage 1 -----------------------------------------------------------------
    def encode_layer(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        """After the attention of encoder layer `attention.layer`, before its MLP."""
        return tokens

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        """On the feature layer's output (what the projector reads), with that layer's attention."""
        return tokens

    # stage 2 -----------------------------------------------------------------
    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        """On the projected visual tokens, before they enter the LLM."""
        return tokens

    def fuse(self, text_embeds: torch.Tensor, tokens: VisualTokens,
             context: PromptContext) -> tuple[torch.Tensor, VisualTokens]:
        """After `project`: the text embeddings (B, L, D) and the visual tokens the LLM will see, e.g. with
        the visual information fused into the text before the visual tokens are compressed (LLaVA-Mini)."""
        return text_embeds, tokens

    def fusion_tokens(self) -> list[list[int]]:
        """Per layer of the LM's shape that the last `fuse` ran outside the LLM, per sample, the
        tokens it ran over (counted in the prefill FLOPs); none by default."""
        return []

    # stage 3 -----------------------------------------------------------------
    def prefill_keep(self, layer: PrefillLayer) -> torch.Tensor:
        """At each of `drop_layers` during prefill: a (B, L) bool mask of the tokens to keep from here on."""
        raise NotImplementedError

    # stage 4 -----------------------------------------------------------------
    def decode_keep(self, layer: int, sequence: Sequence, tokens: VisualTokens) -> torch.Tensor | None:
        """After prefill: a (B, K) bool mask of the cache entries of LLM layer `layer` to keep for
        decoding (only visual entries can go), or None to keep them all. tokens: the visual tokens
        that entered the LLM (sequence.image and sequence.token index them). Return the same tensor for
        layers that keep the same entries of one sequence: they then share one cache view (and, on a
        static cache, one mask per decode step)."""
        return None

    def check_identity(self, model) -> None:
        """Refuse a model other than the one the method's files (e.g. calibrated thresholds) were made for."""

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        """Refuse settings the model cannot honour (a layer it lacks, a budget over its tokens)."""

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}:{opts}" if opts else self.name


def check_ratio(name: str, value: float) -> float:
    """A ratio must lie in (0, 1]."""
    value = float(value)
    if not 0 < value <= 1:
        raise SlimVLMError(f"{name}={value} is outside (0, 1]; give a fraction such as 0.5")
    return value


def check_budget(name: str, budget: int, available: int, item: str = "the largest visual item this model takes") -> int:
    """A token budget must be between 1 and the tokens of `item` (at apply time: the most any visual item of the
    model can have, an image at its largest layout or a video as long as the LM takes; in a forward: the item's own)."""
    if budget < 1:
        raise SlimVLMError(f"{name}={budget} must be at least 1 token")
    if budget > available:
        raise SlimVLMError(f"{name}={budget} is larger than the {available} tokens of {item}; give at most {available}")
    return budget
