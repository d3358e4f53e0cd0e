"""The language-model side every adapter shares: the VLM's LM as a stack of Llama-style decoder layers
(q/k/v projections with RoPE, an MLP), its token embedding and head. The runtime reaches the LM only
through these methods; each family's adapter adds how its images become the LLM's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

import torch
from torch import nn

from ..attention import apply_rope
from ..errors import SlimVLMError
from ..hooks import Installed
from ..sequence import attention_mask_4d, gather_rows
from ..tokens import VisualTokens
from .compat import cache_kwarg, modality_outputs

if TYPE_CHECKING:
    from ..method import Method
    from ..sequence import Sequence


def images_in_prompt_order(placeholders: list[int], counts: list[int], argument: str, kind: str = "image") -> list[int]:
    """Per sample, its images (items of `kind`): items are taken in order, each sample those whose
    placeholders (counts: each item's, by the forward's `argument`) it holds; a sample whose placeholders
    are not whole items' is refused (items left over are named by the rebuild)."""
    out, at = [], 0
    for sample, found in enumerate(placeholders):
        first, taken = at, 0
        while at < len(counts) and taken + counts[at] <= found:
            taken += counts[at]
            at += 1
        if taken != found:
            raise SlimVLMError(
                f"prompt {sample} has {found} {kind} placeholder tokens, not those of whole {kind}s: by {argument} "
                f"the {kind}s take {', '.join(map(str, counts))} in turn; pass the {argument} the processor returned "
                f"with these prompts ({kind}s in prompt order)"
            )
        out.append(at - first)
    return out


def placeholder_runs(input_ids: torch.Tensor, ids: list[int]) -> list[tuple[int, int]]:
    """The runs of placeholders of `ids` in a batch of prompts, as (id, length), prompt after prompt; a run
    never spans two prompts. One read from the device."""
    marked = torch.where(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)), input_ids, -1)
    marked = torch.nn.functional.pad(marked, (0, 1), value=-1).flatten()
    values, lengths = torch.unique_consecutive(marked, return_counts=True)
    return [(int(value), int(length)) for value, length in zip(*torch.stack([values, lengths]).tolist()) if value != -1]


def items_in_prompt_order(runs: Iterable[tuple[Hashable, int]], counts: dict[Hashable, list[int]],
                          names: dict[Hashable, str]) -> list[tuple[Hashable, int]]:
    """The visual items of a batch of prompts in the order their placeholders come, as (kind, index among that
    kind's items), from the prompts' runs of placeholders (kind, length) in order. counts: per kind, each of its
    items' placeholders, items of one kind taken in their own order (as the model scatters them); a run must
    hold whole items. names: per kind, what its items are called in errors ('image', 'video')."""
    taken = dict.fromkeys(counts, 0)
    order = []
    for kind, length in runs:
        items = counts[kind]
        while length and taken[kind] < len(items) and items[taken[kind]] <= length:
            length -= items[taken[kind]]
            order.append((kind, taken[kind]))
            taken[kind] += 1
        if length:
            raise SlimVLMError(
                f"a run of {names[kind]} placeholders is not whole {names[kind]}s': the {names[kind]}s given take "
                f"{', '.join(map(str, items)) or 'none'} in turn, {taken[kind]} placed so far; each item's placeholders "
                f"must be one run, as the processor writes them: put one placeholder per {names[kind]} in the text, let "
                f"the processor expand it, and pass the {names[kind]}s in prompt order"
            )
    for kind, items in counts.items():
        if taken[kind] < len(items):
            raise SlimVLMError(
                f"{len(items)} {names[kind]}(s) given but the prompts have placeholders for {taken[kind]}; put one "
                f"placeholder per {names[kind]} in the text and let the processor expand it"
            )
    return order


CAUSAL_WITHOUT_MASK = frozenset({"sdpa", "flash_attention_2", "flash_attention_3"})  # is_causal when no mask is given
LINEAR_ATTENTION = "linear_attention"  # a layer kind whose cache is a recurrent state (Qwen3.5's Gated DeltaNet)


def run_causal(layers, x: torch.Tensor, rotary: Callable, implementation: str) -> torch.Tensor:
    """Decoder layers over x (B, n, D), each row's real tokens first and its padding after them, rotary
    positions 0..n-1 (`rotary(like, positions)` gives the layers' position embeddings). Causal attention alone
    keeps every real token from the padding (it sees only earlier tokens), so SDPA and flash attention run
    their causal kernels with no mask, and nothing asks the device whether the mask could be dropped (a host
    read, each layer call of transformers' own forward); only eager attention, which has no causality without
    a mask, is given one."""
    batch, length, _ = x.shape
    positions = torch.arange(length, device=x.device).expand(batch, -1)
    embeddings = rotary(x, positions)
    mask = None
    if implementation not in CAUSAL_WITHOUT_MASK:
        mask = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
    for layer in layers:
        out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
        x = out[0] if isinstance(out, tuple) else out
    return x


@dataclass(frozen=True)
class AttentionParts:
    """What the attention-row probe needs of one LLM layer."""

    module: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None  # per-head norms before RoPE (Qwen3's), where the layer has them
    k_norm: nn.Module | None = None
    window: int | None = None  # a sliding-window layer's window (a query sees keys less than it before), else None
    gated_query: bool = False  # q_proj gives each head its query, then a gate on its output (Qwen3.5's gated attention)

    def query_heads(self, projected: torch.Tensor) -> torch.Tensor:
        """q_proj's output (..., H x d) split into heads (..., H, d): where it carries an output gate beside each head's
        query (H x 2d), the query alone. The gate scales the attention's output, not its probabilities."""
        if not self.gated_query:
            return projected.unflatten(-1, (self.num_heads, self.head_dim))
        return projected.unflatten(-1, (self.num_heads, 2 * self.head_dim))[..., : self.head_dim]

    def normed(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries and keys split into heads (..., H, d), through the layer's per-head norms where it has
        them, as its attention takes them to RoPE: scores from unnormed ones would not be the model's."""
        if self.q_norm is None:
            return queries, keys
        return self.q_norm(queries), self.k_norm(keys)


@dataclass(frozen=True)
class DecodeParts:
    """What one decode step runs of an LM: token embedding, the LM body (the module whose outputs
    transformers captures), its decoder layers, final norm and rotary embedding, and the head. rotary_kinds: per
    layer, the kind of layer whose rotary embedding it takes (`rotary(x, position_ids, kind)`: Gemma 3's rope base
    per kind), or None where one serves every layer."""

    embed: torch.nn.Module
    body: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary: torch.nn.Module
    head: torch.nn.Module
    rotary_kinds: tuple[str, ...] | None = None


class LanguageModelAdapter:
    """A VLM's LM: `language_model` (embedding, decoder layers, norm, rotary), `lm_head`, the config's
    image placeholder. Subclasses set the vision side (views, encode, project, pack, check_method)."""

    family = ""
    name = ""  # the family as messages name it
    output_class: type = None  # what the untouched model's forward returns
    vision_capturable = False  # stages 1-2 can replay from one CUDA graph (shapes follow from the batch alone)
    sizes_argument = "image_sizes"  # the forward argument giving each image's size, handed to views()
    tokens_at_origin = False  # each visual token takes its origin's placeholder in the rebuilt prompt (sequence.rebuild)
    adds_layer_features = False  # visual tokens add features to the LM's first layers' outputs (DeepStack)
    static_cache_refusal: str | None = None  # why slimvlm's static cache cannot hold this family's LM, if it cannot
    masks_layer_kinds = False  # builds each view's masks and rotary embeddings per kind of layer, sliding windows too

    def __init__(self, model: nn.Module, language_model: nn.Module) -> None:
        config = model.config
        self.model = model
        self.language_model = language_model
        self.lm_head = model.lm_head
        self.config = config
        self.text_config = config.text_config
        self.image_token_id = config.image_token_id
        self.placeholder_ids: tuple[int, ...] = (config.image_token_id,)  # the visual items' placeholder tokens
        self.llm_layers = list(language_model.layers)
        # per LLM layer its kind, as the config names them ('full_attention', 'sliding_attention', 'linear_attention')
        self.layer_kinds: list[str] = list(getattr(self.text_config, "layer_types", None) or [])
        self.cache_kwarg = cache_kwarg(language_model.forward)
        first = next((layer.self_attn for layer in self.llm_layers if hasattr(layer, "self_attn")), None)
        for name in ("q_proj", "k_proj", "scaling", "head_dim"):
            if not hasattr(first, name):
                raise SlimVLMError(
                    f"the language model {type(language_model).__name__} has no attention.{name}; "
                    "slimvlm supports Llama-family language models (q/k projections with RoPE)"
                )

    # ---- which methods run here ---------------------------------------------------------------
    @classmethod
    def refusal(cls, method: "Method") -> str | None:
        """Why this family cannot run `method` whatever the checkpoint (what the method needs of the family's
        images or positions, not their sizes), or None: check_method raises it, `slimvlm methods` lists by it."""
        return None

    def method_limits(self, method: "Method") -> tuple[int, int, int]:
        """What `method` may reach here: vision encoder layers, LLM layers, tokens per image."""
        raise NotImplementedError

    def check_method(self, method: "Method") -> None:
        """Refuse, before any work, a method this model cannot honour: its kind (refusal), a layer it lacks, a
        budget over its tokens."""
        reason = self.refusal(method)
        if reason is not None:
            raise SlimVLMError(reason)
        method.check_model(*self.method_limits(method))

    def pack(self, tokens: VisualTokens) -> VisualTokens:
        """Each image's projected views joined into its LLM tokens: one view per image, as it is."""
        return tokens

    # ---- what a family's forward takes besides pixels ------------------------------------------
    def visual_inputs(self, arguments: dict) -> tuple[torch.Tensor, object] | None:
        """What views() takes of a forward's visual items, (pixels, sizes); None where it brings none (a
        decode step, a text-only forward). Here images: pixel_values and the sizes argument."""
        pixels = arguments.get("pixel_values")
        return None if pixels is None else (pixels, arguments.get(self.sizes_argument))

    def synthetic_videos(self, count: int, frames: int, generator: torch.Generator) -> tuple[dict, int]:
        """Random videos of `frames` frames, as the processor would hand them over, and each one's placeholders:
        for benchmarks on families that take videos."""
        raise SlimVLMError(f"{type(self.model).__name__} takes no videos here; benchmark it on images (leave out --video-frames)")

    def synthetic_span(self, tokens: int, video_frames: int) -> list[int]:
        """The ids a synthetic item of `tokens` tokens (a video of `video_frames` frames, where given) takes in a
        prompt: one run of its placeholders."""
        return [self.config.video_token_id if video_frames else self.image_token_id] * tokens

    def projector_counts(self, projected: VisualTokens) -> list[int] | torch.Tensor:
        """Per encoder view, the tokens its projector ran on, given the tokens project() returned: on the device
        where the host does not know them (the statistics read them when asked)."""
        return projected.counts if projected.known is None else list(projected.known)

    def visual_outputs(self, tokens: VisualTokens) -> dict:
        """The output fields carrying the visual tokens the LLM got, as the untouched model fills them."""
        return modality_outputs({"image": tokens.split()}, self.output_class)

    def check_inputs(self, arguments: dict) -> None:
        """Refuse, on any forward, inputs of the model's own that the adapter does not honour (none here
        beyond those the runtime checks)."""

    def positions_kept(self, keep_positions: bool | None) -> bool:
        """Whether visual tokens keep their own rotary positions (apply's keep_positions; None: the family's
        default, renumbered here)."""
        return bool(keep_positions)

    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The untouched prompt's position ids (B, L), or (B, L, axes) for multi-axis RoPE; None: 0, 1, 2..."""
        return position_ids

    def patch_generate(self) -> Callable[[], None] | None:
        """Change how generate() prepares this family's inputs, where slimvlm needs it; returns the undo
        (none here: generate() repeats batch-first pixel_values per sequence correctly)."""
        return None

    def text_inputs(self, input_ids: torch.Tensor) -> dict:
        """What the family's processor returns beside input_ids for these prompts (none here)."""
        return {}

    # ---- the language model ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def decode_parts(self) -> DecodeParts:
        """What one decode step runs (runtime/decode_step.py), layer by layer."""
        lm = self.language_model
        return DecodeParts(self.model.get_input_embeddings(), lm, lm.layers, lm.norm, lm.rotary_emb, self.lm_head)

    def run_llm(self, embeds, attention_mask, position_ids, cache, use_cache, **kwargs):
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self.cache_kwarg: cache},
            **kwargs,
        )

    # ---- the masks and rotary embeddings each layer takes --------------------------------------
    # One causal mask and one rotary embedding serve every layer here; an LM whose layers differ (Gemma 3's
    # sliding-window and global layers, its image tokens' two-way blocks) builds its own, per kind of layer.
    def mask_inputs(self, arguments: dict) -> dict:
        """What of a prefill call (the model's forward's arguments) the LM's masks follow: nothing here."""
        return {}

    def two_way_visual_runs(self, mask_inputs: dict) -> bool:
        """Whether the LM's prefill masks let each run of visual tokens attend to itself both ways: no, causal here."""
        return False

    def prompt_mask(self, sequence: "Sequence", embeds: torch.Tensor, cache, mask_inputs: dict) -> torch.Tensor | dict:
        """The attention_mask the LM's own forward takes over a rebuilt prompt: the 2D mask of its real tokens, from
        which the LM builds its causal masks."""
        return sequence.valid.long()

    def view_prefill_mask(self, sequence: "Sequence", hidden: torch.Tensor, mask_dtype: torch.dtype | None,
                          mask_inputs: dict):
        """The mask of the prefill's layers after a stage-3 drop, over the kept tokens `sequence`: causal, padding
        masked."""
        return attention_mask_4d(sequence.valid, sequence.valid.shape[1], mask_dtype)

    def view_decode_mask(self, view, steps: int, mask_dtype: torch.dtype | None, session, positions: torch.Tensor):
        """The mask of a decode step's `steps` new tokens (at `positions`) in the layers of `view` (one of the
        session's; its key_valid holds the new tokens, its layers' cache not yet): causal, padding masked."""
        return attention_mask_4d(view.key_valid, steps, mask_dtype)

    def view_position_embeddings(self, embeddings, gather: torch.Tensor, sequence: "Sequence", like: torch.Tensor):
        """The rotary embeddings of the layers after a stage-3 drop: the earlier view's `embeddings` gathered at the
        kept tokens (`sequence`, gathered by `gather`)."""
        return self.gather_position_embeddings(embeddings, gather)

    def for_layer(self, value, layer: int):
        """A view's mask or rotary embeddings as LLM layer `layer` takes them: the one of the layer's kind where the
        adapter made one per kind (a dict, masks_layer_kinds), else the one for every layer."""
        return value[self.layer_kinds[layer]] if isinstance(value, dict) else value

    def two_way_pairs(self, arguments: dict) -> torch.Tensor | None:
        """(B, L, L) the (query, key) pairs of a prompt that the model's own mask lets attend beyond causal attention,
        from the forward's `arguments`: none here."""
        return None

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per LLM layer, the sliding window its attention keeps to (None: every earlier token, or a linear-attention
        layer, which recurrent_layers names), by the rule transformers sizes its caches by: the config's layer_types,
        else a window on every layer where the config sets sliding_window. slimvlm's static cache serves these kinds
        of layer; others are refused there."""
        window = getattr(self.text_config, "sliding_window", None)
        kinds = getattr(self.text_config, "layer_types", None) or (
            ["full_attention" if window is None else "sliding_attention"] * len(self.llm_layers))
        others = sorted(set(kinds) - {"full_attention", "sliding_attention", LINEAR_ATTENTION})
        if others:
            raise SlimVLMError(
                f"{self.name}'s language model has {', '.join(others)} layers, which slimvlm's static cache does not "
                "serve (it knows full, sliding-window and linear attention); generate without "
                "cache_implementation='static'"
            )
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)

    def recurrent_layers(self) -> tuple[bool, ...]:
        """Per LLM layer, whether its cache is a recurrent state (linear attention: a convolution state and a
        recurrent one per sequence, no per-token entries), which slimvlm's static cache keeps as transformers'
        own StaticCache does."""
        return tuple(kind == LINEAR_ATTENTION for kind in self.layer_kinds) or (False,) * len(self.llm_layers)

    def attention_parts(self, layer: int) -> AttentionParts:
        attn = self.llm_layers[layer].self_attn
        return AttentionParts(
            module=attn,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            num_heads=self.text_config.num_attention_heads,
            num_kv_heads=self.text_config.num_key_value_heads,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            window=getattr(attn, "sliding_window", None),
        )

    @staticmethod
    def rotate(x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Apply the layer's rotary embedding to x (B, H, L, d)."""
        cos, sin = position_embeddings
        return apply_rope(x, cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1))

    @staticmethod
    def gather_position_embeddings(position_embeddings, index: torch.Tensor):
        cos, sin = position_embeddings
        batch = index.shape[0]
        return (
            gather_rows(cos.expand(batch, -1, -1), index),
            gather_rows(sin.expand(batch, -1, -1), index),
        )

    def takes_masks(self) -> bool:
        """Whether the LM's attention takes the 4D masks slimvlm builds (SDPA and eager do; flash attention not)."""
        return self.text_config._attn_implementation in ("sdpa", "eager")

    def mask_dtype(self, hidden_dtype: torch.dtype) -> torch.dtype | None:
        """The form of 4D attention mask the LM's attention takes: bool for SDPA, additive for eager."""
        implementation = self.text_config._attn_implementation
        if implementation == "sdpa":
            return None
        if implementation == "eager":
            return hidden_dtype
        raise SlimVLMError(
            f"slimvlm builds this LM's attention masks itself (for stage-3/4 methods and on a static cache), which "
            f"needs attn_implementation 'sdpa' or 'eager'; the model uses {implementation!r}: load it with "
            "attn_implementation='sdpa'"
        )

    @staticmethod
    def cache_layers(cache) -> list:
        """Per LLM layer, the object holding that layer's `keys` and `values` tensors."""
        return list(cache.layers)

    # ---- an attention core of slimvlm's own (VTU) -------------------------------------------
    def position_embeddings(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's rotary (cos, sin) for position ids (B, L), as its decoder layers take them."""
        return self.language_model.rotary_emb(like, position_ids=positions)

    def rotary(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_embeddings for rotations that must compose (R_a R_b = R_{a+b}), which holds only
        for plain RoPE: scaled rotary variants are refused."""
        if getattr(self.language_model.rotary_emb, "attention_scaling", 1.0) != 1.0:
            raise SlimVLMError("this LM's rotary embedding is scaled (e.g. YaRN); virtual unmerging needs plain RoPE")
        return self.position_embeddings(like, positions)

    def override_attention(self, layer: int, core) -> callable:
        """Run LLM layer `layer`'s attention with `core(module, q, k, v, state) -> (B, L, H, d)` in place of its
        attention function (projections, RoPE and the KV cache stay the model's), where `core.prepare(kwargs)`
        (the layer call's keyword arguments; it takes out its own) gives a state; None lets the layer run as
        usual. Returns the function that undoes it."""
        attn = self.llm_layers[layer].self_attn
        parts = self.attention_parts(layer)
        original = attn.forward
        cache_name = cache_kwarg(original)

        def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            state = core.prepare(kwargs)
            if state is None:
                return original(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
            cache = kwargs.get(cache_name)
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, attn.head_dim)
            queries, keys = parts.normed(attn.q_proj(hidden_states).view(hidden_shape),
                                         attn.k_proj(hidden_states).view(hidden_shape))
            values = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            queries = self.rotate(queries.transpose(1, 2), position_embeddings)
            keys = self.rotate(keys.transpose(1, 2), position_embeddings)
            if cache is not None:
                keys, values = cache.update(keys, values, attn.layer_idx)
            output = core(attn, queries, keys, values, state)
            return attn.o_proj(output.reshape(*input_shape, -1).contiguous()), None

        attn.forward = Installed(forward)

        def undo() -> None:
            del attn.forward

        return undo
