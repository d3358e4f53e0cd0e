"""`slimvlm demo`: every method at a small and a large budget on held-out testbed scenes, with plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from .bench.evaluate import MethodResult, evaluate, format_table, from_sample, write_json
from .bench.report import plot_accuracy_vs_tokens, plot_source_maps, plot_tokens_vs_complexity
from .encoder_memo import reusing_vision_tower
from .method import BudgetSpec
from .methods.dymu import shipped_thresholds
from .models import adapter_for
from .registry import registered

BUDGETS = (64, 192)


def demo_dtype(device: torch.device) -> str:
    """bfloat16 where a CPU computes it natively (oneDNN's bf16 kernels): it halves the vision tower's time, which
    is most of the demo's on a CPU; float32 elsewhere (a GPU runs the demo in seconds either way, and an older CPU
    would emulate bf16 slower than float32)."""
    return "bfloat16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def budget_specs(model, budget: int, targets: Sequence[int] = ()) -> dict[str, BudgetSpec]:
    """For each registered method but the untouched model (the demo's baseline), the spec (or
    composition) its budget rule (Method.spec_for_budget) gives for about `budget` visual tokens per
    image; None for a method that needs a calibration file or weights the demo does not have.
    `targets`: those of DyMU's thresholds the model folder ships (`shipped_thresholds`)."""
    adapter = adapter_for(model)
    return {name: cls.spec_for_budget(adapter, budget, targets=targets) for name, cls in registered().items() if name != "none"}


def llava_mini_runs(model, processor, items, batch_size: int, prepared: dict | None = None) -> list[MethodResult]:
    """LLaVA-Mini at each budget the model folder ships modules for (`llava_mini/c<C>/`), on the model they were
    trained with (`shipped_model`: the folder's, with the projector and LLM trained alongside), on the same items
    as the other methods, so that its row compares with the untouched model's."""
    from .methods.llava_mini import shipped_model, shipped_weights

    shipped = shipped_weights(model.name_or_path)
    if not shipped:
        return []
    own = shipped_model(model.name_or_path, model.device, str(model.dtype).removeprefix("torch."))
    results = []
    for budget, folder in shipped.items():
        result = evaluate(own, processor, items, f"llava-mini:weights={folder}", batch_size=batch_size, prepared=prepared)
        result.method = f"llava-mini:budget={budget} (own model)"
        results.append(result)
    return results


def source_maps(model, processor, item, path: Path, targets: Sequence[int] = ()) -> Path:
    """The first held-out image under each method at the small budget: what each token covers."""
    from .api import apply
    from .testbed.build import format_prompt

    inputs = processor(images=[item.image], text=[format_prompt(item.question)], return_tensors="pt").to(model.device)
    maps = {}
    for name, spec in budget_specs(model, BUDGETS[0], targets).items():
        if spec is None or name in ("fastv", "vtu"):  # stage-3 methods leave the source map as it is
            continue
        with apply(model, spec) as handle, torch.no_grad():
            model(**inputs)
            per_layer = handle.stats.kv_visual_entries[0]  # what the LLM's layers keep, past stage-3/4 drops
            maps[spec if isinstance(spec, str) else "+".join(spec)] = (handle.stats.sources[0], sum(per_layer) / len(per_layer))
    return plot_source_maps(item.image, maps, adapter_for(model).grid, path)


def run_demo(
    model, processor, samples: int, out: Path, batch_size: int = 16, seed: int = 0, keep_positions: bool = False
) -> list[MethodResult]:
    from .testbed.scenes import make_samples

    started = time.perf_counter()
    items = [from_sample(s) for s in make_samples(samples, seed=seed, split="test")]
    targets = sorted(shipped_thresholds(model.name_or_path)) if model.name_or_path else []
    runs = ["none"] + [spec for budget in BUDGETS for spec in budget_specs(model, budget, targets).values() if spec is not None]
    prepared: dict = {}  # each batch processed once, and the vision tower's untouched layers run once per batch
    with reusing_vision_tower():
        results = [evaluate(model, processor, items, spec, batch_size=batch_size, keep_positions=keep_positions,
                            prepared=prepared) for spec in runs]
        if not keep_positions:  # LLaVA-Mini's model was trained on renumbered positions
            results += llava_mini_runs(model, processor, items, batch_size, prepared)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    print(table)
    write_json(
        out / "summary.json",
        results,
        {"samples": samples, "seed": seed, "budgets": list(BUDGETS), "keep_positions": keep_positions},
    )
    plots = [plot_accuracy_vs_tokens(results, out / "accuracy_vs_tokens.png")]
    varying = plot_tokens_vs_complexity(results, out / "tokens_vs_complexity.png")
    if varying:
        plots.append(varying)
    plots.append(source_maps(model, processor, items[0], out / "merges.png", targets))
    where = f"{torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else str(model.device)
    where += f", {str(model.dtype).removeprefix('torch.')}"
    took = f"{len(results)} runs of {samples} scenes in {time.perf_counter() - started:.0f} s on {where}"
    (out / "README.md").write_text(
        f"# slimvlm demo\n\n{samples} held-out testbed scenes (seed {seed}), budgets {BUDGETS}; {took}.\n\n"
        f"```\n{table}\n```\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    )
    print(f"wrote {out}/summary.json, README.md and " + ", ".join(p.name for p in plots) + f"; {took}")
    return results
