"""End-to-end generate() timing, as users see it: time to first token, whole-call time, decode time
per token, tokens per second and peak memory, per method, on transformers' two paths (the eager
dynamic cache, and the static cache with its compiled decode step), each beside the untouched model
(slimvlm not applied) on the same path, batch and prompt."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..api import apply
from ..errors import SlimVLMError
from ..models import adapter_for
from ..registry import check_runs
from ..sequence import is_placeholder
from .clock import FirstTokens, GenerateClock
from .table import text_table
from .timing import peak_memory_bytes, synchronize

UNTOUCHED = "untouched"
UNTOUCHED_AGAIN = "untouched, again"  # the same run timed after the methods: its ratio is the machine's drift
PATHS = {"eager": {}, "static": {"cache_implementation": "static"}}


@dataclass
class GenerateResult:
    method: str
    path: str
    batch_size: int
    new_tokens: int
    visual_tokens_mean: float  # per image, entering the LLM
    ttft_ms: float  # from the call until the first new tokens reach the host, in the same call as total_ms
    total_ms: float  # generate(max_new_tokens=new_tokens)
    decode_ms_per_token: float  # (total - ttft) / (new_tokens - 1)
    tokens_per_s: float  # batch_size * new_tokens / total
    peak_memory_bytes: int | None
    ttft_ratio: float = 1.0  # against the untouched model on the same path and batch
    total_ratio: float = 1.0
    tokens_per_s_ratio: float = 1.0
    kv_visual_mean: float | None = None  # per sample, visual KV entries the last LLM layer keeps after prefill
    # the first call's whole time after apply (or for the untouched model), before any warm-up: what compiling
    # the decode step, capturing CUDA graphs and building attention kernels cost the user's first generate()
    first_call_ms: float | None = None
    # where the time goes, from one more call with a clock on the vision stages (bench/clock.py; the device synchronised
    # around them): stages 1-2 (vision tower, its stage-1 method, projector, stage-2 method), the LLM prefill to the first
    # token, and the decode; the untouched row's through `none` (the same computation on slimvlm's runtime)
    vision_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    # token-ideal (ideal=True): the untouched vision stages' time plus the untouched model's generate() on a text-only
    # prompt as long as the reduced one (the LLM fed this row's visual tokens with no method): what the token count
    # alone would cost; ideal / measured is the share of the ideal a method keeps
    ideal_ttft_ms: float | None = None
    ideal_total_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def time_generate(model, inputs: dict, new_tokens: int, path: str, warmup: int, repeats: int) -> dict:
    """Median TTFT and whole-call milliseconds of model.generate on `path`, greedy, exactly
    `new_tokens` new tokens (EOS cannot end it early), both read in the same calls (TTFT when the
    first token reaches the host), the first call's whole time (a warm-up's, or the first timed
    call's without one), and the whole call's peak memory."""
    extra = PATHS[path]
    device = model.device

    def generate(streamer=None):
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              streamer=streamer, **extra)

    def timed() -> tuple[float, float]:
        clock = FirstTokens(device)
        synchronize(device)
        begin = time.perf_counter()
        generate(clock)
        synchronize(device)
        return (clock.at - begin) * 1000, (time.perf_counter() - begin) * 1000

    calls = [timed() for _ in range(warmup + repeats)]
    ttfts, totals = zip(*calls[warmup:])
    peak = peak_memory_bytes(generate, device)
    return {"ttft_ms": statistics.median(ttfts), "total_ms": statistics.median(totals), "peak_memory_bytes": peak,
            "first_call_ms": calls[0][1]}


def stage_split(model, handle, inputs: dict, new_tokens: int, path: str) -> dict:
    """vision_ms, prefill_ms, decode_ms of one generate() on `path` of the model `handle` applied to."""
    with GenerateClock(handle) as clock:
        _, split = clock.generate(model, **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  **PATHS[path])
    return {"vision_ms": split.vision * 1000, "prefill_ms": split.prefill * 1000, "decode_ms": split.decode * 1000}


def text_only_inputs(model, inputs: dict, visual_per_sample: float) -> dict:
    """inputs' prompts with their visual placeholders replaced by round(visual_per_sample) text tokens each, and no
    pixels: the untouched LLM fed that many tokens, no vision, no method."""
    adapter = adapter_for(model)
    ids = inputs["input_ids"]
    text = ids[:, ~is_placeholder(ids, adapter.placeholder_ids).any(dim=0)]
    filler = text[:, -1:].expand(-1, round(visual_per_sample))
    ids = torch.cat([text[:, :1], filler, text[:, 1:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **{k: v.to(ids.device) for k, v in adapter.text_inputs(ids).items()}}


def bench_generate(
    model,
    methods: list[list[str]],
    inputs_for,
    batch_sizes: list[int],
    paths: list[str],
    new_tokens: int,
    warmup: int = 1,
    repeats: int = 3,
    progress: bool = True,
    on_result=None,
    ideal: bool = False,
) -> list[GenerateResult]:
    """Per batch size and path: the untouched model, then each method run (specs composed), then the untouched model
    again. inputs_for(batch_size) gives the batch; the ratios compare with the first untouched row of the same
    batch size and path, and the last row's ratios are the drift of the machine over the rows between (what a
    ratio nearer 1 than that does not tell apart). on_result(results so far) after each row (to save partial runs).
    ideal: time each row's token-ideal too (GenerateResult.ideal_ttft_ms)."""
    from tqdm.auto import tqdm

    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SlimVLMError(f"unknown path {', '.join(unknown)}; use {' or '.join(PATHS)}")
    if new_tokens < 2:
        raise SlimVLMError(f"new_tokens={new_tokens}: decode time per token needs at least 2 new tokens")
    check_runs(model, methods)
    runs = [UNTOUCHED] + methods + [UNTOUCHED_AGAIN]
    placeholders = adapter_for(model).placeholder_ids  # an image's or a video's
    results = []
    todo = [(b, p, r) for b in batch_sizes for p in paths for r in runs]
    for batch_size, path, specs in tqdm(todo, desc="bench-generate", disable=not progress):
        inputs = inputs_for(batch_size)
        with torch.inference_mode():
            if specs in (UNTOUCHED, UNTOUCHED_AGAIN):
                timed = time_generate(model, inputs, new_tokens, path, warmup, repeats)
                tokens = float(is_placeholder(inputs["input_ids"], placeholders).sum(dim=1).float().mean())
                kept = tokens
                name = specs
                with apply(model, "none") as handle:
                    timed |= stage_split(model, handle, inputs, new_tokens, path)
            else:
                with apply(model, specs) as handle:
                    timed = time_generate(model, inputs, new_tokens, path, warmup, repeats)
                    tokens = statistics.mean(handle.stats.visual_tokens)
                    kept = statistics.mean(entries[-1] for entries in handle.stats.kv_visual_entries)
                    timed |= stage_split(model, handle, inputs, new_tokens, path)
                    visual = sum(handle.stats.visual_tokens) / batch_size
                name = "+".join(specs)
                if ideal:
                    plain = time_generate(model, text_only_inputs(model, inputs, visual), new_tokens, path, warmup, repeats)
                    vision = next(r.vision_ms for r in results if (r.method, r.batch_size, r.path) == (UNTOUCHED, batch_size, path))
                    timed |= {"ideal_ttft_ms": vision + plain["ttft_ms"], "ideal_total_ms": vision + plain["total_ms"]}
        results.append(GenerateResult(
            method=name, path=path, batch_size=batch_size, new_tokens=new_tokens, visual_tokens_mean=tokens,
            kv_visual_mean=kept,
            decode_ms_per_token=(timed["total_ms"] - timed["ttft_ms"]) / (new_tokens - 1),
            tokens_per_s=batch_size * new_tokens / timed["total_ms"] * 1000, **timed,
        ))
        _add_ratios(results)
        if on_result is not None:
            on_result(results)
    return results


def _add_ratios(results: list[GenerateResult]) -> None:
    reference = {(r.batch_size, r.path): r for r in results if r.method == UNTOUCHED}
    for r in results:
        base = reference[r.batch_size, r.path]
        r.ttft_ratio = r.ttft_ms / base.ttft_ms
        r.total_ratio = r.total_ms / base.total_ms
        r.tokens_per_s_ratio = r.tokens_per_s / base.tokens_per_s


def format_table(results: list[GenerateResult]) -> str:
    header = ["batch", "path", "method", "vis tok", "KV vis", "TTFT ms", "x", "total ms", "x", "decode ms/tok", "tok/s", "x", "peak MB",
              "1st call s", "vision ms", "prefill ms", "decode ms", "ideal/TTFT", "ideal/total"]
    rows = [[
        str(r.batch_size), r.path, r.method, f"{r.visual_tokens_mean:.0f}",
        "-" if r.kv_visual_mean is None else f"{r.kv_visual_mean:.0f}",
        f"{r.ttft_ms:.1f}", f"{r.ttft_ratio:.2f}", f"{r.total_ms:.0f}", f"{r.total_ratio:.2f}",
        f"{r.decode_ms_per_token:.2f}", f"{r.tokens_per_s:.0f}", f"{r.tokens_per_s_ratio:.2f}",
        "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
        "-" if r.first_call_ms is None else f"{r.first_call_ms / 1000:.1f}",
        *("-" if ms is None else f"{ms:.1f}" for ms in (r.vision_ms, r.prefill_ms, r.decode_ms)),
        *("-" if ideal is None else f"{ideal / measured:.2f}"
          for ideal, measured in ((r.ideal_ttft_ms, r.ttft_ms), (r.ideal_total_ms, r.total_ms))),
    ] for r in results]
    return text_table(header, rows)
