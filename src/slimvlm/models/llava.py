"""The LLaVA adapter: LlavaForConditionalGeneration = CLIP vision tower + MLP projector + a
Llama-family LM. The only module in slimvlm that knows this family's module names."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..attention import apply_rope, attention_rows
from ..decoding import DecodeParts
from ..errors import SlimVLMError
from ..graphs import GraphCache
from ..hooks import capture_outputs
from .compat import cache_kwarg
from ..sequence import gather_rows
from ..stages import EncoderAttention, Method
from ..tokens import VisualTokens

SUPPORTED_ATTENTION = ("sdpa", "eager")


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


def attention_off_cudnn(active: bool) -> contextlib.AbstractContextManager:
    """SDPA without its cuDNN kernel while ``active``. cuDNN builds a graph for every sequence length
    it has not seen (49-74 ms each on an H200, torch 2.11: results/README.md), which an encoder
    whose lengths follow the image pays on most calls; the other SDPA kernels have no such cost."""
    if not active:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class LlavaAdapter:
    """LLaVA-1.5: one fixed-size view per image, whose side x side patch tokens (the class token too with
    'full' feature selection) are the image's placeholders. Families built the same way (LLaVA-NeXT)
    subclass it and override how images become views and views become the LLM's tokens."""

    family = "llava"
    output_class = LlavaCausalLMOutputWithPast  # what the untouched model's forward returns
    vision_capturable = True  # stages 1-2 can replay from one CUDA graph (shapes follow from the batch alone)
    vision_towers = ("CLIPVisionModel", "CLIPVisionTransformer")  # the tower classes the encoder loop knows
    has_cls = True  # the tower puts a class token before the patches

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self._check_config(config)
        inner = model.model
        vision = inner.vision_tower
        self.model = model
        self.vision = getattr(vision, "vision_model", vision)
        if type(self.vision).__name__ not in self.vision_towers:
            raise SlimVLMError(
                f"slimvlm's {self.family} adapter runs a {self.vision_towers[0]} vision tower layer by layer, not "
                f"{type(self.vision).__name__}; use a {self.family} checkpoint with the tower of its family"
            )
        self.projector = inner.multi_modal_projector
        self.language_model = inner.language_model
        self.lm_head = model.lm_head
        self.config = config
        self.text_config = config.text_config
        self.vision_config = config.vision_config

        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise SlimVLMError(
                f"vision_feature_layer={layer} (several layers) is not supported yet; use a model with one feature layer"
            )
        total = self.vision_config.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k
        self.vision_layers_run = layer if layer >= 0 else total + 1 + layer
        if not 1 <= self.vision_layers_run <= total:
            raise SlimVLMError(f"vision_feature_layer={layer} does not exist in a {total}-layer vision tower")
        self.select_strategy = config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise SlimVLMError(f"vision_feature_select_strategy={self.select_strategy!r} is not supported; use 'default' or 'full'")
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.grid = (side, side)
        self.tokens_per_image = side * side + (1 if self.select_strategy == "full" and self.has_cls else 0)
        self.image_token_id = config.image_token_id
        self.llm_layers = list(self.language_model.layers)
        self._prefix_graphs: dict[int, GraphCache] = {}  # by the number of untouched encoder layers
        self.cache_kwarg = cache_kwarg(self.language_model.forward)
        first = self.llm_layers[0].self_attn
        for name in ("q_proj", "k_proj", "scaling", "head_dim"):
            if not hasattr(first, name):
                raise SlimVLMError(
                    f"the language model {type(self.language_model).__name__} has no attention.{name}; "
                    "the LLaVA adapter supports Llama-family language models"
                )

    def _check_config(self, config) -> None:
        """Refuse a checkpoint of another family loaded into this class."""
        if getattr(config, "image_grid_pinpoints", None) is not None:
            raise SlimVLMError(
                "this LlavaForConditionalGeneration holds a LLaVA-NeXT checkpoint (its config has image_grid_pinpoints): "
                "loaded as LLaVA-1.5 it drops the AnyRes tiles and image_newline and answers wrongly; load it with "
                "LlavaNextForConditionalGeneration"
            )

    def check_inputs(self, arguments: dict) -> None:
        """Refuse, on any forward, inputs of the model's own that the adapter does not honour (LLaVA-1.5
        has none beyond those the runtime checks)."""

    def check_method(self, method: Method) -> None:
        """Refuse, before any work, a method this model cannot honour (a layer it lacks, a budget over its tokens)."""
        method.check_model(self.vision_layers_run, len(self.llm_layers), self.tokens_per_image)

    # ---- images: views in, the LLM's tokens out ---------------------------------------------
    def views(self, pixel_values: torch.Tensor, image_sizes, interpolate: bool) -> torch.Tensor:
        """The encoder's input, one view per image: pixel_values as given, of the size the vision tower was
        trained at (where interpolating its position embeddings changes nothing): another size gives
        another grid than the prompt's placeholders and the methods' budgets are laid out for."""
        if image_sizes is not None:
            raise SlimVLMError("image_sizes is not supported by the LLaVA adapter (LLaVA-1.5 takes fixed-size images)")
        self._check_view_size(pixel_values, interpolate)
        return pixel_values

    def _check_view_size(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        size = self.vision_config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise SlimVLMError(
                f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels: slimvlm's LLaVA adapter takes {size}x{size} "
                f"images (the model's image_size{', also with interpolate_pos_encoding' if interpolate else ''}); "
                "let the processor resize them"
            )

    def image_tokens(self) -> int | list[int]:
        """The placeholder tokens of every image of the last views() (here one number for all)."""
        return self.tokens_per_image

    def images_per_sample(self, placeholders: list[int]) -> list[int]:
        """Per sample, its images, from its placeholder tokens."""
        return [n // self.tokens_per_image for n in placeholders]

    def pack(self, tokens: VisualTokens) -> VisualTokens:
        """Each image's projected views joined into its LLM tokens: one view per image, as it is."""
        return tokens

    def synthetic_images(self, count: int, generator: torch.Generator) -> tuple[dict, int]:
        """Random pixels for `count` images, as the processor would hand them over, and the placeholders
        each image takes: what a benchmark needs (its numbers do not depend on content)."""
        vision = self.vision_config
        pixels = torch.randn(count, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
        return {"pixel_values": pixels}, self.tokens_per_image

    # ---- stage 1: the vision encoder -------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool = False) -> tuple[VisualTokens, list[torch.Tensor]]:
        """Run the vision tower up to its feature layer, giving a stage-1 method each layer.

        Returns the feature layer's tokens (CLS included) and, per layer run, the tokens each
        image had at its input (for the FLOPs count). graphs: replay the layers that run untouched
        (before the first one the method acts at) from a CUDA graph."""
        with attention_off_cudnn(method is not None and method.varying_lengths):
            return self._encode(pixel_values, method, graphs)

    def _encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool) -> tuple[VisualTokens, list[torch.Tensor]]:
        layers = self.vision.encoder.layers[: self.vision_layers_run]
        untouched = len(layers) if method is None else (0 if method.acts_in_encoder_layers else len(layers) - 1)
        if graphs:
            if untouched not in self._prefix_graphs:
                self._prefix_graphs[untouched] = GraphCache(lambda pixels: self._untouched_layers(pixels, untouched))
            hidden = self._prefix_graphs[untouched](pixel_values)
        else:
            hidden = self._untouched_layers(pixel_values, untouched)
        tokens = VisualTokens.from_patches(hidden, self.grid, has_cls=self.has_cls)
        trace = [tokens.counts] * untouched
        proportional = method is not None and method.proportional_attention
        attention = None
        for index in range(untouched, len(layers)):
            layer = layers[index]
            trace.append(tokens.counts)
            bias = tokens.attention_bias(proportional)
            residual = tokens.x
            attn = layer.self_attn
            with capture_outputs(attn.q_proj, attn.k_proj) as captured:
                attended = attn(hidden_states=layer.layer_norm1(residual), attention_mask=bias)[0]
            attention = self._encoder_attention(index, len(layers), attn, *captured, bias)
            tokens = method.encode_layer(attention, tokens.with_features(residual + attended))
            hidden = tokens.x
            tokens = tokens.with_features(hidden + layer.mlp(layer.layer_norm2(hidden)))
        if method is not None:
            attention.next_rows = self._next_layer_rows(tokens, proportional)
            tokens = method.encode_output(attention, tokens)
        return tokens, trace

    def _untouched_layers(self, pixel_values: torch.Tensor, count: int) -> torch.Tensor:
        """The patch embedding and the first `count` encoder layers, as the model runs them."""
        hidden = self._embed_patches(pixel_values)
        for layer in self.vision.encoder.layers[:count]:
            hidden = hidden + layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)[0]
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return hidden

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's input: CLIP's class and patch embeddings, then its pre-layernorm."""
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

    def _next_layer_rows(self, tokens: VisualTokens, proportional: bool):
        """Attention rows of the encoder layer after the feature layer, on the feature tokens."""
        layers = self.vision.encoder.layers
        if self.vision_layers_run >= len(layers):
            return None
        layer = layers[self.vision_layers_run]
        attn = layer.self_attn
        bias = tokens.attention_bias(proportional)

        def rows(query_index: torch.Tensor) -> torch.Tensor:
            normed = layer.layer_norm1(tokens.x)
            batch, length, _ = normed.shape
            picked = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
            queries = attn.q_proj(picked).view(batch, query_index.shape[1], attn.num_heads, -1).transpose(1, 2)
            keys = attn.k_proj(normed).view(batch, length, attn.num_heads, -1).transpose(1, 2)
            return attention_rows(queries, keys, attn.scale, bias=bias)

        return rows

    def _encoder_attention(self, index: int, num_layers: int, attn: nn.Module, queries, keys, bias) -> EncoderAttention:
        batch, length, _ = keys.shape
        heads = attn.num_heads
        keys = keys.view(batch, length, heads, -1).transpose(1, 2)
        queries = queries.view(batch, length, heads, -1).transpose(1, 2)

        def rows(query_index: torch.Tensor) -> torch.Tensor:
            picked = queries.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, queries.shape[-1]))
            return attention_rows(picked, keys, attn.scale, bias=bias)

        return EncoderAttention(layer=index, num_layers=num_layers, keys=keys, rows=rows)

    # ---- stage 2: after the projector --------------------------------------------------------
    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """LLaVA's feature selection then the MLP projector."""
        if self.select_strategy == "default" and not keep_cls:
            tokens = tokens.drop_cls()
        return tokens.with_features(self.projector(tokens.x))

    # ---- the language model ------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def decode_parts(self) -> DecodeParts:
        """What one decode step runs (decoding.decode_step), layer by layer."""
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
        """Run LLM layer `layer`'s attention with `core(module, q, k, v, mask) -> (B, L, H, d)`
        in place of its attention function (projections, RoPE and the KV cache stay the model's).
        core returns None to let the layer run as usual. Returns the function that undoes it."""
        attn = self.llm_layers[layer].self_attn
        original = attn.forward
        cache_name = cache_kwarg(original)

        def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            if not core.active():
                return original(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
            cache = kwargs.get(cache_name)
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, attn.head_dim)
            queries = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            keys = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            values = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            queries = self.rotate(queries, position_embeddings)
            keys = self.rotate(keys, position_embeddings)
            if cache is not None:
                keys, values = cache.update(keys, values, attn.layer_idx)
            output = core(attn, queries, keys, values)
            return attn.o_proj(output.reshape(*input_shape, -1).contiguous()), None

        attn.forward = forward

        def undo() -> None:
            del attn.forward

        return undo
