"""DyMU's calibrated thresholds as a file: JSON (never pickle), with the identity of the model they were
made for, so that another model's are refused. A model folder may ship its own as `dymu/target_<N>.json`
(`shipped_thresholds`): then `dymu:target=N` and the presets find them without `thresholds=`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SlimVLMError
from ...models import adapter_for

FORMAT = 1
# config entries that say how a model was loaded or run, not what it computes
RUNTIME_KEYS = {
    "dtype", "torch_dtype", "transformers_version", "architectures", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "attn_implementation", "id2label", "label2id", "problem_type",
}
# readable facts kept beside the hash, so a mismatch can say what differs
FACTS = ("model_class", "vision_model_type", "hidden_size", "num_attention_heads", "image_size", "patch_size",
         "vision_feature_layer", "vision_feature_select_strategy", "vision_layers_run", "tokens_per_image")
# where in a model folder the thresholds it ships for itself lie
SHIPPED = "dymu/target_{target}.json"


def shipped_thresholds(folder: str | Path) -> dict[int, Path]:
    """DyMU thresholds a model folder ships for itself, by target (`dymu/target_<N>.json`, made by
    `slimvlm calibrate --target N --out FOLDER/dymu/target_N.json`; the testbed ships 96, 195 and 394)."""
    found = {}
    for path in sorted(Path(folder).glob(SHIPPED.format(target="*"))):
        target = path.stem.removeprefix("target_")
        if target.isdigit():
            found[int(target)] = path
    return found


def identity_of(model) -> dict:
    """What a threshold file is tied to: the model class, a sha256 of the vision config (JSON, sorted
    keys, without load-time entries such as dtype) together with the feature layer and the feature
    selection (the adapter's: what the model reads, where its config names neither, as Gemma 3's), and the
    readable facts behind it."""
    adapter = adapter_for(model)
    config = model.config
    vision = config.vision_config
    kept = {k: v for k, v in vision.to_dict().items() if not k.startswith("_") and k not in RUNTIME_KEYS}
    hashed = {
        "vision_config": kept,
        "vision_feature_layer": adapter.feature_layer,
        "vision_feature_select_strategy": adapter.select_strategy,
    }
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "model_class": type(model).__name__,
        "vision_config_sha256": digest,
        "vision_model_type": getattr(vision, "model_type", None),
        "hidden_size": vision.hidden_size,
        "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_feature_layer": adapter.feature_layer,
        "vision_feature_select_strategy": adapter.select_strategy,
        "vision_layers_run": adapter.vision_layers_run,
        "tokens_per_image": adapter.tokens_per_image,
        "patches": adapter.grid[0] * adapter.grid[1],
    }


@dataclass
class Thresholds:
    """DyMU's calibrated per-layer thresholds (one per encoder layer run) and what they were made for."""

    thresholds: list[float]
    identity: dict
    target: int
    schedule: list[int]
    images: int
    method: str = "dymu"
    source: str | None = field(default=None, compare=False)  # the file it was loaded from (not saved)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "target": self.target,
            "target_counts": "patch tokens after the last encoder layer run, class token excluded",
            "schedule": list(self.schedule),
            "r_total": int(sum(self.schedule)),
            "images": self.images,
            "thresholds": [float(t) for t in self.thresholds],
            "identity": self.identity,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Thresholds":
        path = Path(path)
        if not path.is_file():
            raise SlimVLMError(f"no threshold file at {path}; make one with `slimvlm calibrate --method dymu --target N --out {path}`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SlimVLMError(f"{path} is not a threshold file (not JSON: {error}); make one with `slimvlm calibrate`") from None
        try:
            thresholds = cls(
                thresholds=[float(t) for t in data["thresholds"]],
                identity=dict(data["identity"]),
                target=int(data["target"]),
                schedule=[int(r) for r in data["schedule"]],
                images=int(data["images"]),
                method=str(data.get("method", "dymu")),
                source=str(path),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise SlimVLMError(f"{path} is not a slimvlm threshold file (missing or bad entry {error}); make one with `slimvlm calibrate`") from None
        if data.get("format") != FORMAT or thresholds.method != "dymu":
            raise SlimVLMError(f"{path} is not a DyMU threshold file of format {FORMAT}; make one with `slimvlm calibrate --method dymu`")
        layers = thresholds.identity.get("vision_layers_run")
        if len(thresholds.thresholds) != len(thresholds.schedule) or len(thresholds.thresholds) != layers:
            raise SlimVLMError(
                f"{path} has {len(thresholds.thresholds)} thresholds for a model that runs {layers} encoder layers; "
                "the file is damaged: calibrate again"
            )
        return thresholds

    # ---- checks ---------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.source or "these thresholds"

    def check(self, model) -> None:
        """Refuse a model other than the one the thresholds were calibrated for."""
        mine = identity_of(model)
        if mine["model_class"] == self.identity.get("model_class") and mine["vision_config_sha256"] == self.identity.get("vision_config_sha256"):
            return
        differ = [f"{key} {self.identity.get(key)!r} vs {mine[key]!r}" for key in FACTS if self.identity.get(key) != mine[key]]
        detail = "; ".join(differ) if differ else "the vision configs differ"
        raise SlimVLMError(
            f"{self._where()} were calibrated for another model (file vs this model: {detail}); "
            f"calibrate for this model: `slimvlm calibrate --model PATH --method dymu --target {self.target}`"
        )

    def check_shape(self, num_vision_layers: int, tokens_per_image: int) -> None:
        """What a method can check without the model: layers run and tokens per image."""
        if len(self.thresholds) != num_vision_layers:
            raise SlimVLMError(
                f"{self._where()} hold {len(self.thresholds)} per-layer thresholds but this model runs {num_vision_layers} "
                f"encoder layers: they were made for another model; calibrate for this one (--target {self.target})"
            )
        if self.identity.get("tokens_per_image") != tokens_per_image:
            raise SlimVLMError(
                f"{self._where()} were calibrated for {self.identity.get('tokens_per_image')} tokens per image, this model has "
                f"{tokens_per_image}: they were made for another model; calibrate for this one (--target {self.target})"
            )
