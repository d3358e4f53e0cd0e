"""LLaVA-Mini (Zhang et al., 2025, arXiv 2501.03895): compress each image to C visual tokens
with learnable queries, and fuse the visual information into the text beforehand (stage 2).

Two learned modules (the inference side; training them is a separate step):

* compressor: C learnable queries (C, D) cross-attend (one multi-head attention) over the
  projected visual tokens of an image; a fixed 2D sin-cos encoding of each token's patch
  position is added to the keys (not to the values). Query c attends to the tokens of its own cell
  of the patch grid (the grid cut into C cells, rows x columns, as `pool:budget=C` cuts it; one
  cell, the whole image, at C = 1).
* prefusion: `layers` decoder layers of the LM's own class (the paper uses 4), run per sample
  over [each of its images' visual tokens (uncompressed) followed by that image's C compressed
  tokens, then its text tokens], with the LM's rotary embedding at positions 0..n-1 and a causal
  mask over the whole sequence, as in the authors' code (`encode_images_mini`: x = [image
  features; compressed features; text embeddings], `_prepare_4d_causal_attention_mask`, positions =
  running count of valid tokens). The outputs at the compressed tokens are the visual tokens the
  LLM gets, the outputs at the text positions replace the text embeddings; padding and image
  placeholders keep theirs (rebuild replaces the placeholders). When the forward is given labels
  (training), every labelled position (label != -100: the answer) is left out of the pre-fusion
  sequence and keeps its raw embedding, as the authors' training code does (it treats labelled
  tokens as padding) and as generated tokens do at inference.

Initialisation (`init=`, for training): the queries start at zero and the attention's value and
output projections at the identity, so each compressed token starts as the mean of its cell (the
compressor is `pool:budget=C`); the pre-fusion layers start as copies of the LM's first layers with
their output projections (attention and MLP) zeroed ('lm-silenced', the default), so that every
layer starts as the identity and the whole method as `pool:budget=C` exactly, the copied
attention ready to write once training opens the outputs. 'lm' copies the layers whole; 'random'
draws every weight from `seed`.

Spec: "llava-mini:budget=16,layers=4,weights=FOLDER". Without weights the modules are built by
`init` - such a model is untrained and its answers those of the starting point. The modules are
built for a model when the method is applied (or by `build(model)` beforehand, e.g. to hand
`parameters()` to an optimizer); autograd is left on so that the model's loss trains them.

Saved weights carry a signature of the projector they were trained with (`projector_signature`):
trained together with a fine-tuned projector and LLM, they are refused on any other model (the one
they started from included) instead of answering wrongly there.

Deviations from the authors' code, all for the stage-2 frame slimvlm gives: the compressor reads
the *projected* tokens (the authors compress CLIP features, then project); it is one plain
nn.MultiheadAttention over each query's cell (their Qwen-VL-style resampler attends globally and adds
kv projection, layer norms, an output projection and a query-grid position encoding); several images
of one sample are pre-fused in one sequence (the authors pre-fuse a video's frames one at a time and
average the text). Training: see slimvlm.train.llava_mini.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SlimVLMError
from ..models import LanguageModelAdapter, adapter_for
from ..models.adapter import run_causal
from ..registry import register
from ..sequence import IGNORE_INDEX
from ..method import BudgetSpec, Method, PromptContext, Stage, check_budget
from ..tokens import VisualTokens

WEIGHTS_FILE = "llava_mini.safetensors"
CONFIG_FILE = "llava_mini.json"
FORMAT = "slimvlm-llava-mini-2"  # 2: compressed tokens go through the pre-fusion
INITS = ("lm-silenced", "lm", "random")
# of the weights' norm: a float16 copy of float32 weights moves the sums by up to 0.2% (double rounding), a
# bfloat16 copy not at all; fine-tuning moved the testbed projector's by 0.6-5.7% (one sum past this is enough)
SIGNATURE_TOLERANCE = 0.01


class UntrainedModulesWarning(UserWarning):
    """LLaVA-Mini applied with modules nobody trained."""


def projector_signature(projector: nn.Module, count: int = 4) -> dict:
    """What ties trained modules to the projector they were trained with: `count` sums of all its
    weights under fixed pseudo-random signs, and the weights' norm (computed where the weights are,
    each weight rounded to bfloat16 first, summed in float64). Rounding first makes a float32 and a
    bfloat16 copy of one projector give the same numbers; fine-tuning moves them by far more."""
    sums = [0.0] * count
    squares, offset = 0.0, 0
    for _, weight in sorted(projector.named_parameters()):
        w = weight.detach().reshape(-1).to(torch.bfloat16).to(torch.float64)
        index = torch.arange(offset, offset + w.numel(), device=w.device)
        offset += w.numel()
        squares += float((w * w).sum())
        for k in range(count):
            sign = 1.0 - 2.0 * (((index * (2654435761 + 2 * k)) >> 15) & 1).to(torch.float64)
            sums[k] += float((w * sign).sum())
    return {"sums": sums, "norm": squares ** 0.5}


def check_signature(saved: dict | None, projector: nn.Module, folder) -> None:
    """Refuse a projector other than the one the modules in `folder` were trained with."""
    if not saved:
        return
    mine = projector_signature(projector, len(saved["sums"]))
    tolerance = SIGNATURE_TOLERANCE * max(saved["norm"], mine["norm"])
    if abs(mine["norm"] - saved["norm"]) > tolerance or any(abs(a - b) > tolerance for a, b in zip(mine["sums"], saved["sums"])):
        raise SlimVLMError(
            f"the LLaVA-Mini modules in {folder} were trained with another model (this model's projector is not the one "
            "they were saved with); load the model they were trained with: for the modules a model folder ships, "
            "slimvlm.methods.llava_mini.shipped_model(FOLDER); `slimvlm train` saves its model beside its modules"
        )


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n, dim) fixed sin-cos encoding of positions (n,): [sin(p w_k)..., cos(p w_k)...] with
    w_k = 10000^(-k / (dim/2)), k = 0..dim/2-1 (the MAE / Qwen-VL convention)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angle = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(rows * cols, dim) 2D sin-cos encoding of a patch grid, raster order: patch (r, c) gets
    [sincos_1d(dim/2, r), sincos_1d(dim/2, c)] (first half the row, second half the column)."""
    if dim % 4:
        raise SlimVLMError(f"a 2D sin-cos position encoding needs a width divisible by 4, not {dim}")
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.cat([sincos_1d(dim // 2, r), sincos_1d(dim // 2, c)], dim=1).float()


def silence(layer: nn.Module) -> None:
    """Zero a decoder layer's output projections (attention's o_proj, the MLP's down_proj): the layer then
    adds nothing to its residual stream, the identity, while its other weights stay as they are."""
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        try:
            projection = layer.get_submodule(path)
        except AttributeError:
            raise SlimVLMError(f"{type(layer).__name__} has no {path}; init='lm-silenced' needs Llama-style layers, "
                               "use init='lm' or 'random'") from None
        for param in projection.parameters():
            param.zero_()


def cell_grid(budget: int) -> tuple[int, int]:
    """The C = rows x cols cells the compressor's queries cover: the most square split (rows <= cols)."""
    rows = max(r for r in range(1, math.isqrt(budget) + 1) if budget % r == 0)
    return rows, budget // rows


def patch_cells(grid: tuple[int, int], budget: int) -> torch.Tensor:
    """(patches,) each patch's cell of `cell_grid(budget)`, raster order: equal bins of rows and of
    columns, as pool's adaptive average pooling draws them (cell (i, j) is query i * cols + j)."""
    rows, cols = grid
    cell_rows, cell_cols = cell_grid(budget)
    r = torch.arange(rows) * cell_rows // rows
    c = torch.arange(cols) * cell_cols // cols
    return (r[:, None] * cell_cols + c[None, :]).flatten()


class LlavaMiniModules(nn.Module):
    """The compressor and pre-fusion layers for one LLaVA config.

    config: the LlavaConfig; layer_class: the LM's decoder-layer class (built as
    layer_class(config.text_config, layer_idx)); budget: C queries; layers: pre-fusion layers;
    init: one of INITS (see the module's docstring); source_layers: the LM's decoder layers, which the
    'lm' inits copy; seed, device: the weights 'random' draws (and the key projections always) come from
    `seed` by a generator on `device` (the same seed gives the same weights on the same kind of device).
    """

    def __init__(self, config, layer_class: type[nn.Module], budget: int, layers: int = 4, seed: int = 0,
                 device: torch.device | str = "cpu", init: str = "lm-silenced",
                 source_layers: list[nn.Module] | None = None) -> None:
        super().__init__()
        text = config.text_config
        vision = config.vision_config
        self.hidden = int(text.hidden_size)
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.budget = int(budget)
        self.num_layers = int(layers)
        self.layer_class = layer_class.__name__
        self.num_heads = int(text.num_attention_heads)
        self._text_config = text
        if self.budget < 1:
            raise SlimVLMError(f"budget={budget} must be at least 1 token")
        if self.num_layers < 0:
            raise SlimVLMError(f"layers={layers} must be 0 or more")
        if self.hidden % self.num_heads:
            raise SlimVLMError(f"hidden size {self.hidden} is not divisible by {self.num_heads} heads")
        if init not in INITS:
            raise SlimVLMError(f"init={init!r}: choose one of {', '.join(INITS)}")
        copying = init != "random" and self.num_layers > 0
        if copying and (source_layers is None or len(source_layers) < self.num_layers):
            have = 0 if source_layers is None else len(source_layers)
            raise SlimVLMError(f"init={init!r} copies the LM's first {self.num_layers} layers, and {have} are given; "
                               "use fewer pre-fusion layers or init='random'")
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(int(seed))  # the numbers depend on the device kind
        std = float(getattr(text, "initializer_range", 0.02))
        # built on the meta device and then allocated: every parameter is set below, so the layers'
        # own (costly) default init is skipped - 4 layers of a 7B LM take seconds instead of a minute
        with torch.device("meta"):
            attention = nn.MultiheadAttention(self.hidden, self.num_heads, batch_first=True)
            prefusion = nn.ModuleList([layer_class(text, index) for index in range(self.num_layers)])
        if any(True for _ in attention.buffers()) or any(True for _ in prefusion.buffers()):
            raise SlimVLMError(f"{self.layer_class} holds buffers; LLaVA-Mini pre-fusion supports layers made of parameters only")
        self.queries = nn.Parameter(torch.zeros(self.budget, self.hidden, device=device))
        self.attention = attention.to_empty(device=device)
        self.prefusion = prefusion.to_empty(device=device)
        with torch.no_grad():  # deterministic init, independent of the global RNG
            for name, param in self.named_parameters():
                if "norm" in name and param.dim() == 1:
                    param.fill_(1.0)
                elif name.endswith("bias") or name == "queries":
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)  # the same numbers as randn(...) * std
            # zero queries attend evenly and identity values and output give each query its cell's mean: pool
            eye = torch.eye(self.hidden, device=device)
            self.attention.in_proj_weight[2 * self.hidden :].copy_(eye)
            self.attention.out_proj.weight.copy_(eye)
            if copying:
                for own, source in zip(self.prefusion, source_layers):
                    own.load_state_dict(source.state_dict())
                    if init == "lm-silenced":
                        silence(own)
        self.register_buffer("position", sincos_2d(self.hidden, self.grid).to(device), persistent=False)
        self.register_buffer("cell", patch_cells(self.grid, self.budget).to(device), persistent=False)

    @property
    def attention_implementation(self) -> str:
        """The LM's attention implementation now (the pre-fusion layers share its config)."""
        return getattr(self._text_config, "_attn_implementation", None) or "eager"

    # ---- identity and files --------------------------------------------------------------------
    def identity(self) -> dict:
        return {
            "format": FORMAT,
            "hidden_size": self.hidden,
            "grid": list(self.grid),
            "budget": self.budget,
            "layers": self.num_layers,
            "layer_class": self.layer_class,
            "num_heads": self.num_heads,
        }

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32, trained_with: dict | None = None) -> Path:
        """folder/llava_mini.safetensors (weights in `dtype`) + folder/llava_mini.json (identity, and
        the projector_signature of the model they were trained with); load() reads any floating
        dtype back into the modules' own."""
        from safetensors.torch import save_file

        if not dtype.is_floating_point:
            raise SlimVLMError(f"LLaVA-Mini weights are saved in a floating-point dtype, not {dtype}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps({**self.identity(), "trained_with": trained_with}, indent=2) + "\n")
        return folder

    @staticmethod
    def read_identity(folder: str | Path) -> dict:
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise SlimVLMError(f"no LLaVA-Mini weights in {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
        identity = json.loads(path.read_text())
        if identity.get("format") != FORMAT:
            raise SlimVLMError(f"{path} is not a slimvlm LLaVA-Mini config (format {identity.get('format')!r})")
        return identity

    def load(self, folder: str | Path) -> None:
        """Load weights saved by save(), refusing a file made for other modules or another model."""
        from safetensors.torch import load_file

        folder = Path(folder)
        saved = self.read_identity(folder)
        mine = self.identity()
        for key in ("hidden_size", "grid", "budget", "layers", "layer_class", "num_heads"):
            if saved.get(key) != mine[key]:
                raise SlimVLMError(
                    f"the LLaVA-Mini weights in {folder} were made for {key}={saved.get(key)}, this model/method has {mine[key]}"
                )
        tensors = load_file(str(folder / WEIGHTS_FILE))
        expected = self.state_dict()
        if set(tensors) != set(expected):
            raise SlimVLMError(f"the LLaVA-Mini weights in {folder} do not hold the expected tensors")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise SlimVLMError(f"{name} has shape {tuple(tensor.shape)} in {folder}, expected {tuple(expected[name].shape)}")
        with torch.no_grad():
            for name, param in self.state_dict().items():
                param.copy_(tensors[name].to(param.device, param.dtype))

    # ---- compute -------------------------------------------------------------------------------
    def key_positions(self, tokens: VisualTokens) -> torch.Tensor:
        """(I, N, D) the 2D encoding of each token's first patch; 0 for the class token and padding."""
        origin = tokens.origin
        inside = (origin >= 0) & (origin < self.position.shape[0]) & tokens.valid
        table = self.position.to(device=tokens.x.device, dtype=tokens.x.dtype)
        return torch.where(inside[..., None], table[origin.clamp(0, self.position.shape[0] - 1)], torch.zeros_like(tokens.x))

    def compress(self, tokens: VisualTokens) -> torch.Tensor:
        """(I, C, D): each query's cross-attention over its cell's tokens of each image (a token is in the cell
        of its first patch; a query whose cell holds none, after a stage-1 merge, attends to every token)."""
        if tokens.grid != self.grid:
            raise SlimVLMError(f"the tokens come from a {tokens.grid} grid, the LLaVA-Mini modules were built for {self.grid}")
        dtype = self.queries.dtype
        x = tokens.x.to(dtype)
        keys = x + self.key_positions(tokens).to(dtype)
        queries = self.queries[None].expand(x.shape[0], -1, -1)
        if self.budget == 1:
            out, _ = self.attention(queries, keys, x, key_padding_mask=~tokens.valid, need_weights=False)
            return out
        on_grid = (tokens.origin >= 0) & (tokens.origin < self.cell.shape[0]) & tokens.valid
        cell = torch.where(on_grid, self.cell[tokens.origin.clamp(0, self.cell.shape[0] - 1)], -1)
        allowed = cell[:, None, :] == torch.arange(self.budget, device=x.device)[None, :, None]  # (I, C, N)
        allowed |= ~allowed.any(dim=-1, keepdim=True)
        blocked = ~(allowed & tokens.valid[:, None, :])
        out, _ = self.attention(queries, keys, x, attn_mask=blocked.repeat_interleave(self.num_heads, dim=0),
                                need_weights=False)
        return out

    def prefuse(self, sequence: torch.Tensor, rotary) -> torch.Tensor:
        """Run the pre-fusion layers over sequence (B, n, D), each row's real tokens first and its
        padding after them, causal at rotary positions 0..n-1 (models/adapter.py: run_causal)."""
        return run_causal(self.prefusion, sequence.to(self.queries.dtype), rotary, self.attention_implementation)


def with_compressed(full: VisualTokens, compressed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's pre-fusion tokens: its real tokens, then its C compressed ones, padded at the end.
    Returns (x (I, N + C, D), counts (I,))."""
    counts = full.counts
    budget = compressed.shape[1]
    rank = torch.arange(full.x.shape[1] + budget, device=full.x.device)
    after = rank[None, :] - counts[:, None]  # a place's rank among the compressed tokens
    padded = torch.nn.functional.pad(full.x, (0, 0, 0, budget)).to(compressed.dtype)
    picked = compressed.gather(1, after.clamp(0, budget - 1)[..., None].expand(-1, -1, compressed.shape[-1]))
    x = torch.where((after < 0)[..., None], padded, torch.where((after < budget)[..., None], picked, 0.0))
    return x, counts + budget


def prefusion_sequence(text_embeds: torch.Tensor, text: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor,
                       image_of_sample: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The pre-fusion input of every sample: the real tokens of its images (visual (I, M, D), the first
    counts[i] of image i real), in its order, then its `text` tokens (B, L mask) in order, left-aligned and
    zero-padded to the longest.

    Returns sequence (B, n, D), text_place (B, L): where each text token sits in its row (n for
    the others), visual_place (I, M): where each image's tokens sit in its sample's row (n past its count),
    and each row's length. Built with one gather and one host read (the lengths), not a loop over samples:
    boolean indexing per sample would stop the host at every sample of every step.
    """
    batch, length, dim = text_embeds.shape
    device = text_embeds.device
    order = [(b, i) for b in range(batch) for i in image_of_sample[b]]
    sample_of = torch.tensor([b for b, _ in order], dtype=torch.long, device=device)
    image_ids = torch.tensor([i for _, i in order], dtype=torch.long, device=device)
    ordered = counts[image_ids]  # images in sample order
    visual_total = torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, sample_of, ordered)
    sample_start = visual_total.cumsum(0) - visual_total
    image_start = ordered.cumsum(0) - ordered - sample_start[sample_of]  # an image's first place in its row
    lengths = (visual_total + text.sum(dim=1)).tolist()
    width = max(lengths, default=0)
    rank = torch.arange(visual.shape[1], device=device)
    visual_place = torch.where(rank < ordered[:, None], image_start[:, None] + rank, width)  # (K, M)
    text_place = torch.where(text, visual_total[:, None] + text.long().cumsum(dim=1) - 1, width)  # (B, L)
    # a table of source rows per (sample, place); place `width` collects what is not placed
    features = torch.cat([visual[image_ids].reshape(-1, dim).to(text_embeds.dtype), text_embeds.reshape(-1, dim),
                          text_embeds.new_zeros(1, dim)])
    source = torch.full((batch, width + 1), features.shape[0] - 1, dtype=torch.long, device=device)
    flat = source.view(-1)
    flat.scatter_(0, (sample_of[:, None] * (width + 1) + visual_place).reshape(-1), torch.arange(visual_place.numel(), device=device))
    rows = torch.arange(batch, device=device)[:, None]
    flat.scatter_(0, (rows * (width + 1) + text_place).reshape(-1), visual_place.numel() + torch.arange(batch * length, device=device))
    in_image_order = torch.empty_like(visual_place).index_copy_(0, image_ids, visual_place)
    return features[source[:, :width]], text_place, in_image_order, lengths


SHIPPED = "llava_mini"  # a model folder's trained LLaVA-Mini: <folder>/llava_mini/c<C>/ per budget, model.safetensors
SHIPPED_MODEL = "model.safetensors"  # beside them: the weights (projector, LLM) trained with them, over the folder's own


def shipped_weights(folder: str | Path | None) -> dict[int, Path]:
    """The LLaVA-Mini modules a model folder ships, by budget: `llava_mini/c<C>/`. They run on `shipped_model`."""
    found: dict[int, Path] = {}
    root = Path(folder) / SHIPPED if folder else None
    if root is None or not root.is_dir():
        return found
    for path in sorted(root.glob("c*")):
        budget = path.name.removeprefix("c")
        if budget.isdigit() and (path / CONFIG_FILE).is_file():
            found[int(budget)] = path
    return found


def shipped_model(folder: str | Path, device: torch.device | str = "cpu", dtype: str = "float32") -> nn.Module:
    """The model a folder's shipped LLaVA-Mini modules run on: the folder's own, with `llava_mini/model.safetensors`
    loaded over it where the folder ships one (the projector and LLM trained with the modules; the vision tower,
    frozen in training, is the folder's). One file for all the budgets that were trained on one model."""
    from safetensors.torch import load_file

    from ..models.loading import load_model

    model, _ = load_model(str(folder), torch.device(device), dtype)
    path = Path(folder) / SHIPPED / SHIPPED_MODEL
    if path.is_file():
        trained = load_file(str(path))
        missing, unexpected = model.load_state_dict(trained, strict=False)
        if unexpected or any("vision_tower" not in name for name in missing):
            raise SlimVLMError(f"{path} does not hold the trained parts of the model in {folder} "
                               f"(unexpected: {unexpected[:3]}, missing beyond the vision tower: "
                               f"{[n for n in missing if 'vision_tower' not in n][:3]})")
    return model


@register
class LlavaMini(Method):
    """LLaVA-Mini at stage 2: `budget` query tokens per image, text pre-fused with the visual tokens.

    The compressed tokens do not correspond to patches: each stands for all patches/C of its
    image (size patches/C), their origins are 0..C-1 (query order) and no patch maps to them
    (patch_to_token = -1, so the source map is empty).
    """

    name = "llava-mini"
    description = "LLaVA-Mini: C learnable queries compress each image; pre-fusion layers fuse vision into the text (Zhang et al. '25)"
    stages = frozenset({Stage.PROJECT})
    needs_patch_grid = True  # its keys carry the 2D positions of one patch grid
    grid_from_vision_config = True  # that grid is the vision config's, a projected token per patch

    def __init__(self, budget: int | None = None, layers: int | None = None, weights: str | None = None, seed: int = 0,
                 init: str = "lm-silenced") -> None:
        if init not in INITS:
            raise SlimVLMError(f"init={init!r}: choose one of {', '.join(INITS)}")
        saved = LlavaMiniModules.read_identity(weights) if weights is not None else None
        if budget is None:
            budget = saved["budget"] if saved else 64
        if layers is None:
            layers = saved["layers"] if saved else 4
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise SlimVLMError(f"budget={budget} must be a whole number of tokens, at least 1")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise SlimVLMError(f"layers={layers} must be a whole number, 0 or more")
        if saved is not None:
            for key, value in (("budget", budget), ("layers", layers)):
                if saved.get(key) != value:
                    raise SlimVLMError(f"{key}={value} differs from the {saved.get(key)} the weights in {weights} were made with")
        self.budget = budget
        self.layers = layers
        self.weights = None if weights is None else str(weights)
        self.seed = int(seed)
        self.init = init
        self.modules: LlavaMiniModules | None = None
        self._rotary: nn.Module | None = None
        self._image_token_id: int | None = None
        self._full: VisualTokens | None = None
        self._fusion_lengths: list[int] = []
        self._projector: nn.Module | None = None
        self._checked: nn.Module | None = None
        self.trained_here = False  # set by the training wrapper: untrained modules there are expected

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        return None  # trained together with its own fine-tuned model: the demo runs it apart (demo.llava_mini_runs)

    # ---- building ------------------------------------------------------------------------------
    def build(self, model) -> LlavaMiniModules:
        """The modules for `model` (made once, on the LM's device and dtype, loaded from `weights`
        if given); later calls check that the model matches them."""
        config = model.config
        adapter = adapter_for(model)
        layer_class = type(adapter.llm_layers[0])
        if self.modules is None:
            reference = next(adapter.language_model.parameters())
            # initialised on the LM's device (a CUDA init differs from a CPU one of the same seed)
            modules = LlavaMiniModules(config, layer_class, self.budget, self.layers, self.seed, device=reference.device,
                                       init="random" if self.weights is not None else self.init,
                                       source_layers=adapter.llm_layers)
            if self.weights is not None:
                modules.load(self.weights)
            self.modules = modules.to(device=reference.device, dtype=reference.dtype)
        else:
            text, vision = config.text_config, config.vision_config
            side = vision.image_size // vision.patch_size
            have = (self.modules.hidden, self.modules.grid, self.modules.layer_class)
            want = (int(text.hidden_size), (side, side), layer_class.__name__)
            if have != want:
                raise SlimVLMError(f"this LLaVA-Mini method was built for (hidden, grid, layer) {have}, the model has {want}")
        if self.weights is not None:
            self._check_projector(adapter.projector, self.weights)
        self._rotary = adapter.position_embeddings
        self._image_token_id = int(config.image_token_id)
        self._projector = adapter.projector
        return self.modules

    def _check_projector(self, projector: nn.Module, folder) -> None:
        """Each model's projector is checked once against the modules' file (it costs a pass over its weights)."""
        if self._checked is not projector:
            check_signature(LlavaMiniModules.read_identity(folder).get("trained_with"), projector, folder)
            self._checked = projector

    def parameters(self) -> list[nn.Parameter]:
        """The learnable parameters (queries, attention, pre-fusion layers); call build(model) first."""
        if self.modules is None:
            raise SlimVLMError("build(model) (or apply the method) before asking for its parameters")
        return list(self.modules.parameters())

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        if self.modules is None:
            raise SlimVLMError("nothing to save: build(model) (or apply the method) first")
        return self.modules.save(folder, dtype, trained_with=projector_signature(self._projector))

    def load(self, folder: str | Path) -> None:
        if self.modules is None:
            raise SlimVLMError("build(model) (or apply the method) before loading weights into it")
        self.modules.load(folder)
        self.weights = str(folder)
        self._checked = None
        self._check_projector(self._projector, folder)

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        check_budget("budget", self.budget, tokens_per_image)

    def check_identity(self, model) -> None:
        self.build(model)
        if self.weights is None and not self.trained_here:
            warnings.warn(
                f"llava-mini without weights=: its modules are freshly initialised (seed={self.seed}) and untrained, "
                "so its answers mean nothing; pass weights=FOLDER (`slimvlm train --method llava-mini` writes one)",
                UntrainedModulesWarning, stacklevel=4,
            )

    # ---- stage 2 -------------------------------------------------------------------------------
    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        """The compressed tokens before pre-fusion (fuse runs it and gives the LLM their fused form)."""
        if self.modules is None:
            raise SlimVLMError("the LLaVA-Mini modules are not built; install the method with slimvlm.apply")
        if tokens.min_count() < self.budget:
            raise SlimVLMError(f"budget={self.budget} is more than the {tokens.min_count()} tokens an image has here")
        self._full = tokens
        compressed = self.modules.compress(tokens).to(tokens.x.dtype)
        images, budget = compressed.shape[0], self.budget
        device = tokens.x.device
        patches = tokens.num_patches
        return VisualTokens(
            x=compressed,
            size=torch.full((images, budget), patches / budget, device=device, dtype=torch.float32),
            origin=torch.arange(budget, device=device).expand(images, -1).clone(),
            patch_to_token=torch.full((images, patches), -1, device=device, dtype=torch.long),
            grid=tokens.grid,
            has_cls=False,
            known=[budget] * images,
        )

    def fuse(self, text_embeds: torch.Tensor, tokens: VisualTokens,
             context: PromptContext) -> tuple[torch.Tensor, VisualTokens]:
        full = self._full
        self._full = None
        if full is None:
            raise SlimVLMError("LLaVA-Mini's fuse ran without its project step")
        ids = context.input_ids
        text = ids != self._image_token_id
        if context.attention_mask is not None:
            text = text & context.attention_mask.bool()
        if context.labels is not None:  # training: the answer keeps its raw embeddings
            if context.labels.shape != ids.shape:
                raise SlimVLMError(f"labels {tuple(context.labels.shape)} do not match input_ids {tuple(ids.shape)}")
            text = text & (context.labels == IGNORE_INDEX)
        visual, counts = with_compressed(full, tokens.x)
        sequence, text_place, visual_place, self._fusion_lengths = prefusion_sequence(
            text_embeds, text, visual, counts, context.image_of_sample)
        fused = self.modules.prefuse(sequence, self._rotary).to(text_embeds.dtype)
        dim = text_embeds.shape[-1]
        picked = fused.gather(1, text_place.clamp(max=fused.shape[1] - 1)[..., None].expand(-1, -1, dim))
        sample_of = torch.tensor([b for b, images in enumerate(context.image_of_sample) for _ in images],
                                 device=fused.device)
        order = torch.tensor([i for images in context.image_of_sample for i in images], device=fused.device)
        sample_of = torch.empty_like(sample_of).index_copy_(0, order, sample_of)  # each image's sample, image order
        at = visual_place.gather(1, full.counts[:, None] + torch.arange(self.budget, device=fused.device))
        compressed = fused[sample_of[:, None], at]
        return torch.where(text[..., None], picked, text_embeds), tokens.with_features(compressed.to(tokens.x.dtype))

    def train_rows(self, full: VisualTokens, span, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The LLM's input rows for a batch whose rows hold one image each as one span at one place
        (train/spans.py), with what fuse would give there: `embeds` (B, L, D) the rows' embeddings with the
        span, `full` the images' tokens (dense, one image a row). The pre-fusion runs over [the image's tokens,
        its compressed tokens, the row's text] whole: text after a labelled token (the answer, then padding) is
        never seen by the prompt's tokens (causal), and keeps its raw embedding, as fuse gives it."""
        compressed = self.modules.compress(full).to(full.x.dtype)
        patches = full.x.shape[1]
        text = span.text(embeds)
        fused = self.modules.prefuse(torch.cat([full.x.to(embeds.dtype), compressed.to(embeds.dtype), text], dim=1),
                                     self._rotary).to(embeds.dtype)
        self._fusion_lengths = [fused.shape[1]] * fused.shape[0]
        raw = span.text(labels != IGNORE_INDEX)[..., None]
        fused_text = torch.where(raw, text, fused[:, patches + self.budget :])
        visual = fused[:, patches : patches + self.budget]
        return torch.cat([fused_text[:, : span.start], visual, fused_text[:, span.start :]], dim=1)

    def fusion_tokens(self) -> list[list[int]]:
        return [list(self._fusion_lengths) for _ in range(self.layers)]

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options().items() if v is not None)
        return f"{self.name}:{opts}" if opts else self.name
