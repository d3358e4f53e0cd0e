"""The LLaVA adapter: LlavaForConditionalGeneration = CLIP vision tower + MLP projector + a
Llama-family LM. The only module in slimvlm that knows this family's module names."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from ..attention import attention_rows
from ..errors import SlimVLMError
from ..encoder_memo import untouched_layers
from ..graphs import GraphCache
from ..hooks import capture_outputs
from ..method import EncoderAttention, Method
from ..tokens import VisualTokens
from .adapter import LanguageModelAdapter

SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_off_cudnn(active: bool) -> contextlib.AbstractContextManager:
    """SDPA without its cuDNN kernel while ``active``. cuDNN builds a graph for every sequence length
    it has not seen (49-74 ms each on an H200, torch 2.11: results/README.md), which an encoder
    whose lengths follow the image pays on most calls; the other SDPA kernels have no such cost."""
    if not active:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def pair(value) -> tuple[int, int]:
    """A config's size as (height, width): CLIP and SigLIP give one number, InternViT a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class EncoderBlock:
    """One pre-norm ViT layer as the encoder loop runs it: x + attention(norm_before(x)), then
    x + mlp(norm_after(x)), each branch scaled where the tower has layer scale (InternViT's lambda_1,
    lambda_2). Queries and keys are what the attention scores: after its q/k norms, where it has them."""

    attention: nn.Module  # called as attention(hidden_states=, attention_mask=); has num_heads and scale
    norm_before: nn.Module
    norm_after: nn.Module
    mlp: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    attention_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None

    def attend(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The attention branch's output, to add to the residual."""
        out = self.attention(hidden_states=self.norm_before(hidden), attention_mask=bias)[0]
        return out if self.attention_scale is None else self.attention_scale * out

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLP branch's output, to add to the residual."""
        out = self.mlp(self.norm_after(hidden))
        return out if self.mlp_scale is None else self.mlp_scale * out

    def scored(self) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the queries and keys the attention scores (to capture in a forward)."""
        return (self.q_proj if self.q_norm is None else self.q_norm, self.k_proj if self.k_norm is None else self.k_norm)

    def queries(self, normed: torch.Tensor) -> torch.Tensor:
        queries = self.q_proj(normed)
        return queries if self.q_norm is None else self.q_norm(queries)

    def keys(self, normed: torch.Tensor) -> torch.Tensor:
        keys = self.k_proj(normed)
        return keys if self.k_norm is None else self.k_norm(keys)


class LlavaAdapter(LanguageModelAdapter):
    """LLaVA-1.5: one fixed-size view per image, whose side x side patch tokens (the class token too with
    'full' feature selection) are the image's placeholders. Families built the same way (LLaVA-NeXT)
    subclass it and override how images become views and views become the LLM's tokens."""

    family = "llava"
    name = "LLaVA"  # in messages
    output_class = LlavaCausalLMOutputWithPast
    vision_capturable = True
    vision_towers = ("CLIPVisionModel", "CLIPVisionTransformer")  # the tower classes the encoder loop knows
    has_cls = True  # the tower puts a class token before the patches

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self._check_config(config)
        inner = model.model
        vision = inner.vision_tower
        self.vision = getattr(vision, "vision_model", vision)
        if type(self.vision).__name__ not in self.vision_towers:
            raise SlimVLMError(
                f"slimvlm's {self.family} adapter runs a {self.vision_towers[0]} vision tower layer by layer, not "
                f"{type(self.vision).__name__}; use a {self.family} checkpoint with the tower of its family"
            )
        super().__init__(model, inner.language_model)
        self.projector = inner.multi_modal_projector
        self.vision_config = config.vision_config
        self.blocks = self._blocks()

        self.feature_layer, self.select_strategy = self._feature_selection(config)
        layer = self.feature_layer
        if not isinstance(layer, int):
            raise SlimVLMError(
                f"vision_feature_layer={layer} (several layers) is not supported yet; use a model with one feature layer"
            )
        total = len(self.blocks)
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k
        self.vision_layers_run = layer if layer >= 0 else total + 1 + layer
        if not 1 <= self.vision_layers_run <= total:
            raise SlimVLMError(f"vision_feature_layer={layer} does not exist in a {total}-layer vision tower")
        if self.select_strategy not in ("default", "full"):
            raise SlimVLMError(f"vision_feature_select_strategy={self.select_strategy!r} is not supported; use 'default' or 'full'")
        self.view_size = pair(self.vision_config.image_size)  # (height, width) pixels of a view
        patch = pair(self.vision_config.patch_size)
        self.grid = (self.view_size[0] // patch[0], self.view_size[1] // patch[1])
        self.tokens_per_image = self.grid[0] * self.grid[1] + (1 if self.select_strategy == "full" and self.has_cls else 0)
        self.view_tokens = self.tokens_per_image  # a view's placeholders: its tokens after the projector
        self._prefix_graphs: dict[int, GraphCache] = {}  # by the number of untouched encoder layers

    def _blocks(self) -> list[EncoderBlock]:
        """The vision tower's layers as the encoder loop runs them (CLIP's and SigLIP's names)."""
        return [EncoderBlock(layer.self_attn, layer.layer_norm1, layer.layer_norm2, layer.mlp, layer.self_attn.q_proj,
                             layer.self_attn.k_proj) for layer in self.vision.encoder.layers]

    def _feature_selection(self, config) -> tuple[int, str]:
        """The vision layer the LLM's features come from and which of its tokens it takes, as LLaVA's config names them."""
        return config.vision_feature_layer, config.vision_feature_select_strategy

    def _check_config(self, config) -> None:
        """Refuse a checkpoint of another family loaded into this class."""
        if getattr(config, "image_grid_pinpoints", None) is not None:
            raise SlimVLMError(
                "this LlavaForConditionalGeneration holds a LLaVA-NeXT checkpoint (its config has image_grid_pinpoints): "
                "loaded as LLaVA-1.5 it drops the AnyRes tiles and image_newline and answers wrongly; load it with "
                "LlavaNextForConditionalGeneration"
            )

    def method_limits(self, method: Method) -> tuple[int, int, int]:
        return self.vision_layers_run, len(self.llm_layers), self.tokens_per_image

    # ---- images: views in, the LLM's tokens out ---------------------------------------------
    def views(self, pixel_values: torch.Tensor, image_sizes, interpolate: bool) -> torch.Tensor:
        """The encoder's input, one view per image: pixel_values as given, of the size the vision tower was
        trained at (where interpolating its position embeddings changes nothing): another size gives
        another grid than the prompt's placeholders and the methods' budgets are laid out for."""
        if image_sizes is not None:
            raise SlimVLMError(f"image_sizes is not supported by the {self.name} adapter ({self.name} takes fixed-size views)")
        self._check_view_size(pixel_values, interpolate)
        return pixel_values

    def _check_view_size(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        height, width = self.view_size
        if tuple(pixel_values.shape[-2:]) != self.view_size:
            raise SlimVLMError(
                f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels: slimvlm's {self.name} adapter takes {height}x{width} "
                f"images (the model's image_size{', also with interpolate_pos_encoding' if interpolate else ''}); "
                "let the processor resize them"
            )

    def image_tokens(self) -> int | list[int]:
        """The placeholder tokens of every image of the last views() (here one number for all)."""
        return self.view_tokens

    def images_per_sample(self, placeholders: list[int]) -> list[int]:
        """Per sample, its images, from its placeholder tokens."""
        return [n // self.view_tokens for n in placeholders]

    def synthetic_images(self, count: int, generator: torch.Generator) -> tuple[dict, int]:
        """Random pixels for `count` images, as the processor would hand them over, and the placeholders
        each image takes: what a benchmark needs (its numbers do not depend on content)."""
        pixels = torch.randn(count, self.vision_config.num_channels, *self.view_size, generator=generator)
        return {"pixel_values": pixels}, self.view_tokens

    # ---- stage 1: the vision encoder -------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool = False,
               keep_width: bool = False) -> tuple[VisualTokens, list[torch.Tensor]]:
        """Run the vision tower up to its feature layer, giving a stage-1 method each layer.

        Returns the feature layer's tokens (CLS included) and, per layer run, the tokens each
        image had at its input (for the FLOPs count). graphs: replay the layers that run untouched
        (before the first one the method acts at) from a CUDA graph. keep_width: see EncoderAttention."""
        with attention_off_cudnn(method is not None and method.varying_lengths):
            return self._encode(pixel_values, method, graphs, keep_width)

    def _encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool,
                keep_width: bool) -> tuple[VisualTokens, list[torch.Tensor]]:
        layers = self.blocks[: self.vision_layers_run]
        untouched = len(layers) if method is None else (0 if method.acts_in_encoder_layers else len(layers) - 1)
        if graphs:
            if untouched not in self._prefix_graphs:
                self._prefix_graphs[untouched] = GraphCache(lambda pixels: self._untouched_layers(pixels, untouched))
            hidden = self._prefix_graphs[untouched](pixel_values)
        else:
            hidden = untouched_layers(self.vision, pixel_values, untouched, lambda: self._untouched_layers(pixel_values, untouched))
        tokens = VisualTokens.from_patches(hidden, self.grid, has_cls=self.has_cls)
        trace = [tokens.counts] * untouched
        proportional = method is not None and method.proportional_attention
        attention = sized = None
        for index in range(untouched, len(layers)):
            block = layers[index]
            if tokens.size is not sized:  # new only where the method regrouped the tokens
                sized, counts, bias = tokens.size, tokens.counts, tokens.attention_bias(proportional)
            trace.append(counts)
            residual = tokens.x
            with capture_outputs(*block.scored()) as captured:
                attended = block.attend(residual, bias)
            attention = self._encoder_attention(index, len(layers), block.attention, *captured, bias, keep_width)
            tokens = method.encode_layer(attention, tokens.with_features(residual + attended))
            hidden = tokens.x
            tokens = tokens.with_features(hidden + block.feed_forward(hidden))
        if method is not None:
            attention.next_rows = self._next_layer_rows(tokens, proportional)
            tokens = self._encode_output(method, attention, tokens)
        return tokens, trace

    def _encode_output(self, method: Method, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        """The stage-1 method's last word on the feature layer's tokens."""
        return method.encode_output(attention, tokens)

    def _untouched_layers(self, pixel_values: torch.Tensor, count: int) -> torch.Tensor:
        """The patch embedding and the first `count` encoder layers, as the model runs them."""
        hidden = self._embed_patches(pixel_values)
        for block in self.blocks[:count]:
            hidden = hidden + block.attend(hidden, None)
            hidden = hidden + block.feed_forward(hidden)
        return hidden

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's input: CLIP's class and patch embeddings, then its pre-layernorm."""
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

    def _next_layer_rows(self, tokens: VisualTokens, proportional: bool):
        """Attention rows of the encoder layer after the feature layer, on the feature tokens."""
        if self.vision_layers_run >= len(self.blocks):
            return None
        block = self.blocks[self.vision_layers_run]
        attn = block.attention
        bias = tokens.attention_bias(proportional)

        def rows(query_index: torch.Tensor) -> torch.Tensor:
            normed = block.norm_before(tokens.x)
            batch, length, _ = normed.shape
            picked = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
            queries = block.queries(picked).view(batch, query_index.shape[1], attn.num_heads, -1).transpose(1, 2)
            keys = block.keys(normed).view(batch, length, attn.num_heads, -1).transpose(1, 2)
            return attention_rows(queries, keys, attn.scale, bias=bias)

        return rows

    def _encoder_attention(self, index: int, num_layers: int, attn: nn.Module, queries, keys, bias,
                           keep_width: bool) -> EncoderAttention:
        batch, length, _ = keys.shape
        heads = attn.num_heads
        keys = keys.view(batch, length, heads, -1).transpose(1, 2)
        queries = queries.view(batch, length, heads, -1).transpose(1, 2)

        def rows(query_index: torch.Tensor) -> torch.Tensor:
            picked = queries.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, queries.shape[-1]))
            return attention_rows(picked, keys, attn.scale, bias=bias)

        return EncoderAttention(layer=index, num_layers=num_layers, keys=keys, rows=rows, keep_width=keep_width)

    # ---- stage 2: after the projector --------------------------------------------------------
    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """LLaVA's feature selection then the MLP projector."""
        if self.select_strategy == "default" and not keep_cls:
            tokens = tokens.drop_cls()
        return tokens.with_features(self.projector(tokens.x))
