"""The cost of one LLM decoder layer in prefill: plain over the full sequence, plain over a merged
sequence, and virtual token unmerging (VTU) over the same merged sequence.

Each case runs the whole model once with slimvlm applied (so the layer's inputs, rotary
embeddings and, for VTU, the runtime's copies are exactly what the library makes), captures the
inputs of decoder layer `layer` with a forward pre-hook, then times that layer alone on them (no
KV cache) while the method stays applied: the VTU case runs the library's own attention override
(models/adapter.py override_attention + runtime/unmerge.py virtual_unmerge_attention).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..api import apply
from ..models import adapter_for
from ..models.compat import cache_kwarg
from . import flops as flops_mod
from .run import synthetic_inputs
from .table import text_table
from .timing import median_ms, peak_memory_bytes


@dataclass
class LayerResult:
    case: str
    methods: list[str]
    batch_size: int
    layer: int
    tokens: float  # per sample, tokens through the layer (projections, MLP)
    attended: float  # per sample, tokens its attention runs over (the copies under VTU)
    latency_ms: float
    peak_memory_bytes: int | None
    extra_memory_bytes: int | None  # peak during the layer minus what was allocated before it
    flops: int = 0  # analytic, summed over the batch (slimvlm/bench/flops.py llm_layer_prefill_flops)
    visual_tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def cases_for(merge: str) -> list[tuple[str, list[str]]]:
    return [("full", ["none"]), ("merged", [merge]), ("merged+vtu", [merge, "vtu"])]


def bench_layer(model, merge: str = "tome:r=16", batch_size: int = 1, text_tokens: int = 64, layer: int = 2,
                warmup: int = 3, repeats: int = 10, inputs: dict | None = None) -> list[LayerResult]:
    """Time LLM layer `layer` alone, per case of cases_for(merge), on one synthetic batch."""
    adapter = adapter_for(model)
    decoder = adapter.llm_layers[layer]
    _, shape = flops_mod.shapes(model.config)
    inputs = inputs or synthetic_inputs(model, batch_size, text_tokens)
    device = model.device
    results = []
    for case, specs in cases_for(merge):
        captured: dict = {}

        def grab(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, dict(kwargs)

        # merged tokens keep their patches' positions, as VTU needs, so both merged cases see the same input
        handle = apply(model, specs, keep_positions=True)
        hook = decoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)  # the cache keeps VTU's session (copies) alive
                hook.remove()
                args, kwargs = captured["args"], captured["kwargs"]
                kwargs.update({cache_kwarg(decoder.forward): None}, use_cache=False)
                run = lambda: decoder(*args, **kwargs)  # noqa: E731
                latency = median_ms(run, device, warmup, repeats)
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
                peak = peak_memory_bytes(run, device)
            stats = handle.stats
            tokens = stats.llm_tokens[layer]
            attended = stats.attention_tokens[layer]
            results.append(LayerResult(
                case=case, methods=specs, batch_size=inputs["input_ids"].shape[0], layer=layer,
                tokens=statistics.mean(tokens), attended=statistics.mean(attended), latency_ms=latency,
                peak_memory_bytes=peak, extra_memory_bytes=None if peak is None else peak - before,
                flops=sum(flops_mod.llm_layer_prefill_flops(shape, n, m, layer, runs)
                          for n, m, runs in zip(tokens, attended, flops_mod.two_way_runs_of(stats, layer))),
                visual_tokens=list(stats.visual_tokens),
            ))
        finally:
            hook.remove()
            handle.remove()
    return results


def format_table(results: list[LayerResult]) -> str:
    header = ["batch", "case", "tokens", "attended", "ms", "GFLOPs", "extra MB", "peak MB"]
    rows = [[
        str(r.batch_size), r.case, f"{r.tokens:.0f}", f"{r.attended:.0f}", f"{r.latency_ms:.3f}", f"{r.flops / 1e9:.1f}",
        "-" if r.extra_memory_bytes is None else f"{r.extra_memory_bytes / 2**20:.0f}",
        "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
    ] for r in results]
    return text_table(header, rows)
