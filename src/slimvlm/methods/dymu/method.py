"""DyMU's dynamic token merging, DToMe (Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging
for Efficient VLMs", arXiv 2504.17040), in the vision encoder (stage 1).

ToMe with a threshold instead of a fixed r. In every encoder layer l, after attention and before
the MLP, the tokens are split alternately into A (even) and B (odd), each A token finds its most
similar B token by the cosine similarity of the layer's keys averaged over heads, and EVERY A token
whose best similarity is strictly greater than the layer's threshold tau_l merges into its B
partner (size-weighted mean, proportional attention on). The class token never merges; padding
never takes part. Tokens follow the published order between layers (unmerged A, then B: see
methods/tome.py), also after a layer that merged nothing, and return to spatial order at the output. Simple images have many near-duplicate patches and keep few tokens, busy images
keep many: the count varies per image (VisualTokens pads the batch).

The thresholds come from a calibration pass (`slimvlm calibrate`, see calibration.py): for a
target average of `target` tokens, layer l merges r_l tokens per image on average (the authors'
constant schedule, r_total = tokens - target split evenly over the layers run); on batches of
images it ranks the A tokens of the WHOLE batch, merges the top B * r_l and takes as tau_l the
similarity of the first edge not merged (at least 0), averaged over batches. The authors' code
(MikeWangWZHL/dymu, src/open_clip/tome.py `batch_level_bipartite_soft_matching`,
src/open_clip_train/threshold_finder.py) does exactly this, with a running mean over batches and a
strict '>' at inference.

Presets (paper, Table 2, LLaVA-1.5-7B with CLIP ViT-L/14-336, 576 patch tokens): DyMU-low keeps
89 +- 27 tokens on average, DyMU-mid 195 +- 47, DyMU-high 394 +- 57. The authors calibrate them as
open_clip configs "ViT-L-14-336-tome-{72,192,384}out": r_total = 504 / 384 / 192 over all 24
CLIP layers, constant schedule 21 / 16 / 8 per layer (ViT-L-14-336-tome-72out.json: r_total 504,
r_schedule constant); LLaVA reads layer 23, so the nominal counts are 576 - 23 r = 93 / 208 / 392
patches (the paper's ToMe rows at the same r: 94 / 209 / 393 tokens). Our presets name the paper's
measured averages, target = 89 / 195 / 394, and `slimvlm calibrate` spreads 576 - target over the
layers slimvlm runs (23 for LLaVA-1.5), which gives the same per-layer r within one token.

`target` counts the patch tokens that leave the last encoder layer run, the class token excluded:
for LLaVA-1.5 ('default' feature selection) exactly the visual tokens the LLM sees.

VTU (virtual token unmerging, the paper's second half) runs in the LLM at prefill; with vtu=true
(the default) this method asks the runtime for it (`virtual_unmerge`), with vtu=false the merged
tokens go to the LLM as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ...errors import SlimVLMError
from ...method import BudgetSpec, EncoderAttention, Method, Stage
from ...registry import register
from ...tokens import VisualTokens
from ..tome import merge_published, spatial_order
from .matching import threshold_merge
from .thresholds import SHIPPED, Thresholds

if TYPE_CHECKING:
    from ...models.adapter import LanguageModelAdapter


def _missing_thresholds(wanted: str, target, out, where: str = "") -> str:
    found = f" ({where})" if where else ""
    return (
        f"dymu needs per-layer thresholds calibrated for {wanted}{found}: run "
        f"`slimvlm calibrate --model PATH --method dymu --target {target} --images DIR --out {out}` first, "
        "then pass thresholds=FILE (e.g. 'dymu:thresholds=FILE.json')"
    )


@register
class DyMU(Method):
    name = "dymu"
    description = (
        "DyMU: dynamic token merging by calibrated per-layer thresholds, tokens vary per image, "
        "+ virtual unmerging in the LLM unless vtu=false (Wang et al. 2025)"
    )
    # the defaults (vtu=true) act at both stages; an instance sets its own from `vtu`
    stages = frozenset({Stage.ENCODE, Stage.PREFILL})
    proportional_attention = True
    varying_lengths = True

    def __init__(self, thresholds: str | None = None, target: int | None = None, vtu: bool = True) -> None:
        """thresholds: a JSON file written by `slimvlm calibrate` (or a Thresholds object); target: the
        average patch tokens per image it must have been calibrated for (presets set it); vtu:
        virtual token unmerging in the LLM at prefill. Without thresholds, the model folder's own
        for `target` are taken when the method is applied (`dymu/target_<N>.json`)."""
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 1):
            raise SlimVLMError(f"dymu: target={target!r} must be a whole number of tokens >= 1 (the average kept per image)")
        if not isinstance(vtu, bool):
            raise SlimVLMError(f"dymu: vtu={vtu!r} must be true or false")
        self.target = target
        self.vtu = vtu
        self.stages = frozenset({Stage.ENCODE, Stage.PREFILL}) if vtu else frozenset({Stage.ENCODE})
        self.virtual_unmerge = vtu
        self.deferred = thresholds is None or thresholds == ""
        if self.deferred:
            if target is None:
                raise SlimVLMError(_missing_thresholds("a target N", "N", "FILE.json"))
            self.thresholds, self.calibration, self.taus = None, None, []  # the model's own, found at apply
        else:
            self._use(thresholds)

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, targets: Sequence[int] = (), **context: Any) -> BudgetSpec:
        """Thresholds are calibrated per model (`slimvlm calibrate`): the target nearest the budget among
        `targets`, those the model folder ships (`shipped_thresholds`); None if it ships none."""
        return f"dymu:target={min(targets, key=lambda t: (abs(t - budget), t))}" if targets else None

    def _use(self, thresholds) -> None:
        if isinstance(thresholds, Thresholds):
            calibration = thresholds
            self.thresholds = calibration.source or "<in memory>"
        else:
            calibration = Thresholds.load(str(thresholds))  # a spec may hand a name like '123' over as a number
            self.thresholds = str(thresholds)
        if self.target is not None and calibration.target != self.target:
            raise SlimVLMError(
                f"dymu: the thresholds in {self.thresholds} were calibrated for target={calibration.target} tokens, "
                f"but target={self.target} was asked for; calibrate with --target {self.target} or give the matching file"
            )
        self.calibration = calibration
        self.taus = [float(t) for t in calibration.thresholds]

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.calibration is not None:  # thresholds still to be found are checked in check_identity
            self.calibration.check_shape(num_vision_layers, tokens_per_image)

    def check_identity(self, model) -> None:
        """The full check: the file was made for this model's vision tower (config hash, feature layer
        and selection). check_model sees only the layer count and tokens per image. Without
        thresholds=, the model folder's own for the target are taken (thresholds.shipped_thresholds)."""
        if self.deferred:
            folder = getattr(model, "name_or_path", "") or ""
            path = Path(folder) / SHIPPED.format(target=self.target) if folder else None
            if path is None or not path.is_file():
                where = f"{folder!r} ships none at {SHIPPED.format(target=self.target)}" if folder else "the model has no folder"
                raise SlimVLMError(_missing_thresholds(f"the target of {self.target} tokens", self.target, path or "FILE.json", where))
            self._use(path)
        self.calibration.check(model)

    def encode_layer(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        if self.calibration.schedule[attention.layer] == 0:  # the authors' code skips such a layer
            return tokens
        metric = attention.keys.mean(dim=1)
        # a layer that merges nothing still reorders, as the authors' batch-level merge does
        return merge_published(tokens, threshold_merge(metric, tokens.valid, tokens.is_cls, self.taus[attention.layer]))

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        return spatial_order(tokens)

