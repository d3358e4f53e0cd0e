"""MustDrop: Multi-stage vision token dropping (Liu et al., arXiv 2411.10803), stages 1, 3 and 4.

One method, four parts, each switchable:

1. Local spatial merging (`lsm`, stage 1, after encoder layer 0): the patch grid (CLS excluded) is
   cut into non-overlapping `window` x `window` windows; a window whose tokens' mean pairwise
   cosine similarity (self-pairs excluded) is >= `threshold` becomes ONE token (size-weighted
   mean). The features compared are the layer's hidden states, as in the authors' code (not keys).
2. Important set S (`important`, stage 1, at the encoder output): the ceil(`important_ratio` x
   patch tokens) patch tokens with the highest CLS attention (mean over heads) of the LAST encoder
   layer, i.e. the layer after LLaVA's feature layer (the authors read the attention of the layer
   whose input LLaVA takes). A tower without a class token (SigLIP: LLaVA-OneVision) ranks by the
   attention a token receives, averaged over heads and all queries (VisionZip's score there,
   methods/visionzip.py). S is remembered by patch origin, so stages 3-4 find it again.
3. Dual-attention filter (`filter`, stage 3): after each of the authors' pruning layers `layers`
   (default 2, 6, 10, 14; a layer p drops at the input of layer p + 1 using layer p's attention),
   with the question's text rows (the text after the image) averaged over heads: a visual token
   is dropped when global (its attention summed over those rows) < `global_thr` x the sum of
   global over its image's tokens AND individual (the max over those rows) < `individual_thr`.
   S is never dropped.
4. Output-aware KV cache (`output_cache`, stage 4): after prefill, LLM layers >= `cache_from_layer`
   (default: the first pruning layer) keep in their cache only the visual entries of
   `cache_keep`: "final" (default) the tokens that survived the last prefill drop, which is what
   the authors' code does (their layers 2..14 caches are index-selected to the final set), or
   "important" the set S alone.

Budgets are threshold-driven: each image keeps what its attention earns, and the authors' "64 /
128 / 192 tokens" is the visual-token count averaged over all LLM layers (their printed "equal
token number"), reached on LLaVA-1.5-7B TextVQA with the thresholds of the presets.

Differences from the authors' code, all forced or chosen (see the module's tests):
- the merge runs where slimvlm's stage-1 hook sits, after layer 0's attention and before its MLP
  (the authors merge the layer's output, after its MLP), so layer 0's MLP runs on merged tokens;
- r (windows merged) is per image by default; the authors take the minimum over the batch
  (`lsm_batch_min=true`), which makes an image's result depend on its batch (their evaluation
  runs one image at a time, where both agree);
- merged tokens stay in spatial order (the authors put merged windows first, in similarity order);
- positions follow slimvlm's runtime (`keep_positions`), not the authors' renumbering;
- at batch 1 on a GPU the merge keeps the token tensor's width (merged-away slots become padding, masked in
  attention) so that the tower and stage 1 replay as one CUDA graph: there the encoder is paid in launches,
  not in its tokens; elsewhere it compacts to the tokens left.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SlimVLMError
from ..registry import register
from ..sequence import Sequence
from ..method import BudgetSpec, EncoderAttention, Method, PrefillLayer, Stage, check_ratio
from ..tokens import VisualTokens
from ..attention import received_attention

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter

CACHE_KEEP = ("final", "important")


def parse_layers(layers) -> tuple[int, ...]:
    """'2;6;10;14' (or '2,6,10,14' from Python, an int, or a sequence of ints) -> (2, 6, 10, 14)."""
    if isinstance(layers, bool):
        raise SlimVLMError(f"mustdrop: layers={layers!r} is not a list of LLM layers; write e.g. layers=2;6;10;14")
    if isinstance(layers, int):
        values = [layers]
    elif isinstance(layers, str):
        parts = [p for p in re.split(r"[;,/+\s]+", layers.strip()) if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise SlimVLMError(f"mustdrop: cannot read layers={layers!r}; write LLM layer indices as e.g. layers=2;6;10;14") from None
    else:
        try:
            values = [int(v) for v in layers]
        except (TypeError, ValueError):
            raise SlimVLMError(f"mustdrop: cannot read layers={layers!r}; give LLM layer indices such as (2, 6, 10, 14)") from None
    if not values:
        raise SlimVLMError("mustdrop: layers is empty; give at least one pruning layer, e.g. layers=2")
    if min(values) < 0:
        raise SlimVLMError(f"mustdrop: layers={layers!r} has a negative layer; LLM layers count from 0")
    return tuple(sorted(set(values)))


def window_similarity(features: torch.Tensor, grid: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, P, D) of the P = rows x cols patches in raster order -> (mean pairwise cosine
    similarity of each window's tokens, self-pairs excluded (B, W), patches of each window (W, k)),
    windows non-overlapping, in raster order; patches beyond the last full window are left out."""
    rows, cols = grid
    gh, gw = rows // window, cols // window
    at = torch.arange(rows * cols, device=features.device).view(rows, cols)[: gh * window, : gw * window]
    patches = at.reshape(gh, window, gw, window).permute(0, 2, 1, 3).reshape(gh * gw, window * window)
    k = window * window
    normed = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    members = normed[:, patches]  # (B, W, k, D)
    sims = members @ members.transpose(-1, -2)
    off_diagonal = sims.sum(dim=(-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (k * (k - 1)), patches


def window_merge_assign(similarity: torch.Tensor, patches: torch.Tensor, patch_token: torch.Tensor, num_tokens: int, threshold: float, batch_min: bool) -> torch.Tensor:
    """Token -> group assignment merging, per image, its qualifying windows (similarity >=
    threshold) each into one token; with batch_min only the top-r windows of each image, r the
    fewest qualifying windows in the batch (the authors' rule). patch_token (B, P): the token of each
    patch. Returns assign (B, num_tokens): every token its own index, a merged window's members the
    index of its first member."""
    batch = similarity.shape[0]
    qualifies = similarity >= threshold
    if batch_min:
        r = int(qualifies.sum(dim=1).min().item())
        order = similarity.argsort(dim=1, descending=True, stable=True)
        chosen = torch.zeros_like(qualifies)
        chosen.scatter_(1, order[:, :r], True)
    else:
        chosen = qualifies
    assign = torch.arange(num_tokens, device=similarity.device).expand(batch, num_tokens).clone()
    member_tokens = patch_token[:, patches]  # (B, W, k)
    target = member_tokens[..., :1].expand_as(member_tokens)
    merged = torch.where(chosen[..., None], target, member_tokens)
    assign.scatter_(1, member_tokens.flatten(1), merged.flatten(1))
    return assign


def important_tokens(attention: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """attention (B, N) each token gets (from the class token, or received on average); candidates (B, N) the
    patch tokens -> (B, N) bool: per image the ceil(ratio x its patch tokens) candidates with the highest attention."""
    count = torch.ceil(ratio * candidates.sum(dim=1).double() - 1e-9).long()
    scores = attention.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < count[:, None]) & candidates


def dual_attention_drop(rows: torch.Tensor, query_valid: torch.Tensor, visual: torch.Tensor, image: torch.Tensor, protected: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """The dual-attention filter: rows (B, H, Q, L) attention probabilities of the text queries,
    query_valid (B, Q), visual (B, L) the visual tokens (padding excluded), image (B, L) the image
    of each (-1 for text), protected (B, L) never dropped. Returns drop (B, L): global (summed over
    valid queries, mean over heads) < global_thr x its image's total global AND individual (max over
    valid queries) < individual_thr."""
    attention = rows.float().mean(dim=1)  # (B, Q, L)
    valid = query_valid[..., None]
    global_score = attention.masked_fill(~valid, 0).sum(dim=1)
    individual = attention.masked_fill(~valid, float("-inf")).max(dim=1).values if attention.shape[1] else torch.full_like(global_score, float("-inf"))
    safe_image = torch.where(visual, image, 0)
    # per image, its tokens' total; an image index is below the token count, so no read-back sizes the sums
    total = global_score.new_zeros(visual.numel()).scatter_add_(0, safe_image.flatten(), global_score.masked_fill(~visual, 0).flatten())
    image_total = total[safe_image]
    return visual & ~protected & (global_score < global_thr * image_total) & (individual < individual_thr)


@register
class MustDrop(Method):
    name = "mustdrop"
    description = "MustDrop: local spatial merge + CLS key set in the encoder, dual-attention filter in prefill, KV cache policy (Liu et al. 2024)"
    stages = frozenset({Stage.ENCODE, Stage.PREFILL, Stage.DECODE})
    encoder_state = ("_important", "_survivors")
    cache_keeps_one_set = True  # the text and the final survivors (or S): each prefill view holds them all

    def __init__(
        self,
        lsm: bool = True,
        window: int = 3,
        threshold: float = 0.8,
        important: bool = True,
        important_ratio: float = 0.08,
        filter: bool = True,
        layers: str = "2;6;10;14",
        global_thr: float = 0.011,
        individual_thr: float = 0.01,
        output_cache: bool = True,
        cache_keep: str = "final",
        cache_from_layer: int | None = None,
        lsm_batch_min: bool = False,
    ) -> None:
        for flag, value in (("lsm", lsm), ("important", important), ("filter", filter), ("output_cache", output_cache), ("lsm_batch_min", lsm_batch_min)):
            if not isinstance(value, bool):
                raise SlimVLMError(f"mustdrop: {flag}={value!r} must be true or false")
        if isinstance(window, bool) or int(window) != window or window < 2:
            raise SlimVLMError(f"mustdrop: window={window} must be an integer >= 2 (the side of a merging window, 3 in the paper)")
        if not -1 <= float(threshold) <= 1:
            raise SlimVLMError(f"mustdrop: threshold={threshold} is a cosine similarity; give a value in [-1, 1] (0.8 in the paper)")
        for key, value in (("global_thr", global_thr), ("individual_thr", individual_thr)):
            if not 0 <= float(value) <= 1:
                raise SlimVLMError(f"mustdrop: {key}={value} is a fraction of attention; give a value in [0, 1]")
        if cache_keep not in CACHE_KEEP:
            raise SlimVLMError(f"mustdrop: cache_keep={cache_keep!r}; use one of {', '.join(CACHE_KEEP)}")
        if output_cache and cache_keep == "important" and not important:
            raise SlimVLMError("mustdrop: cache_keep=important keeps the important set in the cache; set important=true or cache_keep=final")
        if cache_from_layer is not None and (isinstance(cache_from_layer, bool) or int(cache_from_layer) != cache_from_layer or cache_from_layer < 0):
            raise SlimVLMError(f"mustdrop: cache_from_layer={cache_from_layer} must be an LLM layer index >= 0")
        self.lsm = lsm
        self.varying_lengths = lsm  # windows merge where their tokens agree, so counts follow the image
        self.capturable = not lsm_batch_min  # the batch's fewest qualifying windows is read back
        self.window = int(window)
        self.threshold = float(threshold)
        self.important = important
        self.important_ratio = check_ratio("important_ratio", important_ratio)
        self.filter = filter
        self.pruning_layers = parse_layers(layers)
        self.layers = ";".join(str(layer) for layer in self.pruning_layers)
        self.global_thr = float(global_thr)
        self.individual_thr = float(individual_thr)
        self.output_cache = output_cache
        self.cache_keep = cache_keep
        self.cache_from_layer = self.pruning_layers[0] if cache_from_layer is None else int(cache_from_layer)
        self.lsm_batch_min = lsm_batch_min
        # the stages this instance acts at: a part switched off costs nothing
        stages = set()
        if lsm or important:
            stages.add(Stage.ENCODE)
        if filter:
            stages.add(Stage.PREFILL)
            self.queries = "text_after_image"
            self.drop_layers = tuple(layer + 1 for layer in self.pruning_layers)
        if output_cache:
            stages.add(Stage.DECODE)
        self.stages = frozenset(stages)
        # per forward: S as (images, patches) bool by patch origin; the visual tokens that survived
        # the latest prefill drop as (images, tokens that entered the LLM) bool
        self._important: torch.Tensor | None = None
        self._survivors: torch.Tensor | None = None
        self._last_keep: tuple | None = None  # (what it was made from, decode_keep's mask)

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        # threshold-driven: the authors' preset nearest the budget (their budgets average over LLM layers)
        return f"mustdrop-llava7b-{min((64, 128, 192), key=lambda preset: abs(preset - budget))}"

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.filter:
            usable = tuple(layer + 1 for layer in self.pruning_layers if layer + 1 < num_llm_layers)
            if not usable:
                raise SlimVLMError(
                    f"mustdrop: pruning layers {self.layers} all need a layer after them, but the language model has "
                    f"{num_llm_layers} layers; give layers below {num_llm_layers - 1}, e.g. layers=0"
                )
            self.drop_layers = usable  # pruning layers past the model's depth are skipped
        if self.output_cache and self.cache_from_layer >= num_llm_layers:
            raise SlimVLMError(
                f"mustdrop: cache_from_layer={self.cache_from_layer} but the language model has {num_llm_layers} layers; "
                f"give cache_from_layer < {num_llm_layers}"
            )

    # stage 1 -----------------------------------------------------------------
    def encode_layer(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        if not self.lsm or attention.layer != 0:
            return tokens
        rows, cols = tokens.grid
        if self.window > min(rows, cols):
            raise SlimVLMError(f"mustdrop: window={self.window} is larger than the {rows}x{cols} patch grid; use a smaller window")
        if not tokens.uniform:  # known on the host: fresh patches, one token each
            raise SlimVLMError("mustdrop: local spatial merging needs the encoder's full, unmerged patch tokens at layer 0")
        patch_token = tokens.patch_to_token  # (B, P)
        features = tokens.x.gather(1, patch_token[..., None].expand(-1, -1, tokens.x.shape[-1]))
        similarity, patches = window_similarity(features, tokens.grid, self.window)
        assign = window_merge_assign(similarity, patches, patch_token, tokens.x.shape[1], self.threshold, self.lsm_batch_min)
        return tokens.regroup(assign, tokens.x.shape[1], width=tokens.x.shape[1] if attention.keep_width else None)

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        self._important = None
        self._survivors = None
        if not self.important:
            return tokens
        batch = tokens.batch_size
        rows = attention.next_rows if attention.next_rows is not None else attention.rows
        if tokens.has_cls:
            cls_index = tokens.is_cls.long().argmax(dim=1, keepdim=True)  # (B, 1)
            score = rows(cls_index).float().mean(dim=1)[:, 0]  # (B, N): mean over heads
        else:
            score = received_attention(rows, tokens.valid)
        chosen = important_tokens(score, tokens.valid & ~tokens.is_cls, self.important_ratio)
        patch = tokens.origin.clamp(0, tokens.num_patches - 1)  # CLS and padding are never chosen
        important = torch.zeros(batch, tokens.num_patches, dtype=torch.int32, device=chosen.device)
        self._important = important.scatter_add_(1, patch, chosen.int()) > 0
        return tokens

    def important_mask(self, sequence: Sequence, tokens: VisualTokens | None) -> torch.Tensor:
        """(B, L) True at the visual tokens of the important set S (found by patch origin)."""
        visual = sequence.visual & sequence.valid
        if self._important is None:
            return torch.zeros_like(visual)
        if tokens is None:
            raise SlimVLMError("mustdrop: the stage-3/4 hooks need the visual tokens that entered the LLM to find the important set")
        important = tokens.patches_from_views(self._important)  # chosen per encoder view (LLaVA-NeXT: per crop)
        image = sequence.image.clamp_min(0)
        origin = tokens.origin[image, sequence.token.clamp(0, tokens.x.shape[1] - 1)]
        patch = origin.clamp(0, important.shape[1] - 1)
        is_patch = (origin >= 0) & (origin < important.shape[1])
        return visual & is_patch & important[image, patch]

    # stage 3 -----------------------------------------------------------------
    def prefill_keep(self, layer: PrefillLayer) -> torch.Tensor:
        sequence = layer.sequence
        visual = sequence.visual & sequence.valid
        protected = self.important_mask(sequence, layer.tokens)
        drop = dual_attention_drop(layer.rows, layer.query_valid, visual, sequence.image, protected, self.global_thr, self.individual_thr)
        keep = ~drop
        if layer.tokens is not None:  # per image, its tokens still in the sequence (scattered: no read-back)
            images, width = layer.tokens.x.shape[:2]
            at = torch.where(visual, sequence.image * width + sequence.token, 0)
            survivors = torch.zeros(images * width, dtype=torch.int32, device=keep.device)
            self._survivors = (survivors.scatter_add_(0, at.flatten(), (visual & keep).int().flatten()) > 0).view(images, width)
        return keep

    # stage 4 -----------------------------------------------------------------
    def decode_keep(self, layer: int, sequence: Sequence, tokens: VisualTokens) -> torch.Tensor | None:
        """Layers that see one sequence get one tensor: the runtime gives them one cache view."""
        if layer < self.cache_from_layer:
            return None
        if self.cache_keep != "important" and self._survivors is None:
            return None  # nothing was dropped in prefill: the final set is every token
        made_from = (sequence, tokens, self._survivors)
        if self._last_keep is not None and all(a is b for a, b in zip(self._last_keep[0], made_from)):
            return self._last_keep[1]
        if self.cache_keep == "important":
            keep = ~sequence.visual | self.important_mask(sequence, tokens)
        else:
            image = sequence.image.clamp_min(0)
            token = sequence.token.clamp(0, self._survivors.shape[1] - 1)
            keep = ~sequence.visual | self._survivors[image, token]
        self._last_keep = (made_from, keep)
        return keep
