"""The FLOPs formula against a hand count on a tiny config; the bench and its CLI on the tiny model."""

import json
import time
from pathlib import Path

import torch
from conftest import batch, select

import slimvlm.models.loading

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from slimvlm.bench import flops
from slimvlm.bench.generate import time_generate
from slimvlm.bench.run import parse_methods, synthetic_inputs
from slimvlm.cli import main
from slimvlm.models.loading import load_model
from slimvlm.runtime import Stats


def tiny_config():
    vision = CLIPVisionConfig(hidden_size=2, intermediate_size=3, num_hidden_layers=2, num_attention_heads=1,
                              image_size=2, patch_size=1, num_channels=1)
    text = LlamaConfig(hidden_size=4, intermediate_size=5, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=2, vocab_size=7)
    return LlavaConfig(vision_config=vision, text_config=text)


def test_flops_hand_count():
    stats = Stats(
        visual_tokens=[2],
        vision_tokens=[[3], [2]],  # layer 0 saw 3 tokens (CLS + 2 merged patches), layer 1 saw 2
        projector_tokens=[2],
        llm_tokens=[[4], [3]],  # layer 0 saw 4 tokens, layer 1 saw 3 (one dropped at layer 1)
        kv_entries=[[4, 3]],
        prompt_tokens=[6],
    )
    counted = flops.count(tiny_config(), stats)
    # vision, d=2, f=3: n=3: 8*3*2^2 + 4*3^2*2 + 4*3*2*3 = 96 + 72 + 72 = 240
    #                   n=2: 8*2*2^2 + 4*2^2*2 + 4*2*2*3 = 64 + 32 + 48 = 144; patch embedding 2*4*(1*1^2)*2 = 16
    assert counted.vision == 240 + 144 + 16
    # projector, 2 tokens: 2 * (2*2*4 + 2*4*4) = 96
    assert counted.projector == 96
    # LLM, D=4, H=2, H_kv=1, h=2, F=5, V=7:
    #   n=4: 4*4*4*2*2 + 4*4*4*1*2 = 384; attention 2*2*2*4*5 = 160; MLP 6*4*4*5 = 480 -> 1024
    #   n=3: 4*3*4*2*2 + 4*3*4*1*2 = 288; attention 2*2*2*3*4 = 96;  MLP 6*3*4*5 = 360 -> 744
    #   logits of the last token: 2*4*7 = 56
    assert counted.llm_prefill == 1024 + 744 + 56
    # decode, cache 4+1 and 3+1 entries: 4*4*2*2 + 4*4*1*2 = 96 per layer; attention 4*2*2*c; MLP 6*4*5 = 120
    assert counted.decode_per_token == (96 + 16 * 5 + 120) + (96 + 16 * 4 + 120) + 56
    assert counted.prefill == 400 + 96 + 1824
    # virtual unmerging: layer 1's attention runs over 4 copies of its 3 tokens (2*2*2*4*5 instead of 2*2*2*3*4)
    stats.attention_tokens = [[4], [4]]
    unmerged = flops.count(tiny_config(), stats)
    assert unmerged.llm_prefill == 1024 + (744 - 96 + 160) + 56
    assert unmerged.decode_per_token == counted.decode_per_token + 16 * 1  # layer 1 attends one more copy
    # KV bytes: entries * 2 (k, v) * H_kv * h * bytes
    assert flops.kv_bytes(tiny_config(), 10, 2) == 10 * 2 * 1 * 2 * 2


def test_parse_methods():
    assert parse_methods("none,tome:r=8,fastv:k=2,ratio=0.5,tome:r=4+fastv") == [
        ["none"], ["tome:r=8"], ["fastv:k=2,ratio=0.5"], ["tome:r=4", "fastv"]
    ]
    # a preset's options follow ':' (this once cost a GPU run: the bench now checks every spec first)
    assert parse_methods("mustdrop-llava7b-64,output_cache=false") == [["mustdrop-llava7b-64:output_cache=false"]]


def test_bench_refuses_a_bad_spec_before_running_any(tiny):
    import pytest

    from slimvlm import SlimVLMError
    from slimvlm.bench.run import run_bench

    model, _ = tiny
    with pytest.raises(SlimVLMError, match="unknown method"):
        run_bench(model, [["none"], ["nonsense"]], progress=False)


def test_bench_cli_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_dir), "--methods", "tome:r=8,fastv:k=2,ratio=0.5,divprune:budget=64",
                 "--json", str(out), "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prefill TFLOPs" in printed and "fastv:k=2,ratio=0.5" in printed
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["model"] == str(tiny_dir)
    results = {r["method"]: r for r in payload["results"]}
    assert list(results) == ["none", "tome:r=8", "fastv:k=2,ratio=0.5", "divprune:budget=64"]
    keys = {"method", "options", "visual_tokens_mean", "visual_tokens_min", "visual_tokens_max", "prefill_flops",
            "flops_ratio", "kv_bytes_per_image", "latency_ms"}
    assert keys <= set(results["none"])
    assert results["none"]["flops_ratio"] == 1.0
    assert results["tome:r=8"]["visual_tokens_mean"] == 576 - 2 * 8  # the tiny tower runs 2 layers to its feature layer
    assert results["divprune:budget=64"]["visual_tokens_max"] == 64
    assert results["divprune:budget=64"]["flops_ratio"] < results["fastv:k=2,ratio=0.5"]["flops_ratio"] < 1
    assert results["fastv:k=2,ratio=0.5"]["options"] == {"fastv": {"k": 2, "ratio": 0.5}}
    # KV bytes per image: 576 visual entries in each of 4 layers, 2 kv heads of 16 dims, float32
    assert results["none"]["kv_bytes_per_image"] == 576 * 4 * 2 * 2 * 16 * 4


def test_cli_reports_bad_input(capsys):
    assert main(["bench", "--model", "/nonexistent", "--device", "cpu"]) == 2
    assert "no model at /nonexistent" in capsys.readouterr().err
    if not (Path(slimvlm.models.loading.TESTBED) / "config.json").exists():
        assert main(["demo", "--device", "cpu"]) == 2
        assert "slimvlm make-tiny DIR" in capsys.readouterr().err


def test_projector_tokens_are_counted_before_stage_2(fresh):

    import slimvlm
    from conftest import batch

    model, processor = fresh
    with torch.no_grad():
        for spec, through in (("divprune:budget=32", 576), ("visionzip:dominant=20,contextual=5", 25), ("none", 576)):
            with slimvlm.apply(model, spec) as handle:
                model(**batch(processor, 2))
            assert handle.stats.projector_tokens == [through, through], spec


def test_bench_generate_cli_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "generate.json"
    code = main(["bench-generate", "--model", str(tiny_dir), "--methods", "none,divprune:budget=64", "--batch-sizes", "1,2",
                 "--paths", "eager,static", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    assert "TTFT ms" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("slimvlm bench-generate") and payload["new_tokens"] == 3
    rows = [(r["batch_size"], r["path"], r["method"]) for r in payload["results"]]
    # per batch size and path: the untouched model (the reference of the ratios) first, then each method, then the
    # untouched model again (its ratios: the drift over the rows between)
    assert rows == [(b, p, m) for b in (1, 2) for p in ("eager", "static")
                    for m in ("untouched", "none", "divprune:budget=64", "untouched, again")]
    for r in payload["results"]:
        assert r["total_ms"] >= r["ttft_ms"] > 0 and r["first_call_ms"] > 0
        assert r["decode_ms_per_token"] == (r["total_ms"] - r["ttft_ms"]) / 2
        assert abs(r["tokens_per_s"] - r["batch_size"] * 3 / r["total_ms"] * 1000) < 1e-6
        if r["method"] == "untouched":
            assert r["ttft_ratio"] == r["total_ratio"] == r["tokens_per_s_ratio"] == 1.0
        assert min(r["vision_ms"], r["prefill_ms"], r["decode_ms"]) > 0  # where one more call's time went
    assert {r["visual_tokens_mean"] for r in payload["results"] if r["method"] == "divprune:budget=64"} == {64}
    assert {r["kv_visual_mean"] for r in payload["results"] if r["method"] == "divprune:budget=64"} == {64}
    assert all(r["ideal_ttft_ms"] is None for r in payload["results"])  # asked for with --ideal
    assert main(["bench-generate", "--model", str(tiny_dir), "--paths", "fast", "--device", "cpu"]) == 2
    assert "--paths 'fast'" in capsys.readouterr().err


def test_bench_generate_reports_the_first_calls_time_apart_from_the_medians(fresh, monkeypatch):
    """The first generate() after apply pays for compiling and capturing: reported alone, out of the medians."""
    model, processor = fresh
    original, calls = model.generate, []

    def slow_first(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1:
            time.sleep(1.0)  # far above a loaded CPU's generate() of the tiny model (300 ms was not)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", slow_first)
    with torch.inference_mode():
        timed = time_generate(model, select(batch(processor, 1), 0), 2, "eager", warmup=1, repeats=2)
    # the first call alone carries the second of sleep; the medians do not (their difference, not a bound on the
    # medians, which a loaded CPU can stretch past a second)
    assert timed["first_call_ms"] >= 1000 and timed["first_call_ms"] - timed["total_ms"] > 500


def test_bench_cli_on_tiny_llava_next(tiny_next_dir, tmp_path):
    """Synthetic images of the largest pinpoint (2 x 2 tiles, nothing cut): 64 + 16 x 17 tokens each."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_next_dir), "--methods", "tome:r=4,divprune:budget=64", "--json", str(out),
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu"])
    assert code == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["visual_tokens_mean"] == 64 + 16 * 17
    assert results["tome:r=4"]["visual_tokens_mean"] == 64 + 16 * 17 - 5 * 2 * 4  # 5 crops, 2 layers, r = 4
    assert results["divprune:budget=64"]["visual_tokens_max"] == 64
    assert results["divprune:budget=64"]["flops_ratio"] < results["tome:r=4"]["flops_ratio"] < 1


def test_llava_next_7b_shape():
    from transformers import LlavaNextConfig

    from slimvlm.bench.shapes import shape_config

    config = shape_config("llava-next-7b")
    assert isinstance(config, LlavaNextConfig) and config.image_grid_pinpoints[2] == [672, 672]
    assert config.text_config.to_dict() == shape_config("llava-1.5-7b").text_config.to_dict()


def test_flops_hand_count_qwen():
    """Qwen2.5-VL: per-segment attention (a 2-window block), a gated MLP, a Conv3d patch embedding over two
    frames, the 2x2 merger; Qwen2-VL: a plain MLP of embed_dim x mlp_ratio."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(hidden_size=4, intermediate_size=5, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=7)
    patches = dict(patch_size=1, in_channels=1, temporal_patch_size=2, spatial_merge_size=2, num_heads=1)
    stats = Stats(visual_tokens=[2], vision_tokens=[[8, 0], [4, 4]], projector_tokens=[2], llm_tokens=[[4], [4]],
                  kv_entries=[[4, 4]], prompt_tokens=[4])
    qwen25 = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=2, hidden_size=2, intermediate_size=3,
                                                                    out_hidden_size=4, **patches))
    counted = flops.count(qwen25, stats)
    # d=2, f=3, gated: n=8: 8*8*2^2 + 4*8^2*2 + 6*8*2*3 = 256 + 512 + 288 = 1056; each window n=4: 128 + 128 + 144 = 400
    # patch embedding, 8 patches of 1 channel x 2 frames x 1^2 pixels: 2*8*2*2 = 64
    assert counted.vision == 64 + 1056 + 2 * 400
    # merger, 2 tokens: 4 patches of width 2 -> hidden 8 -> D=4: 2 * (2*8*8 + 2*8*4) = 384
    assert counted.projector == 384
    qwen2 = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=2, mlp_ratio=2, hidden_size=4, **patches))
    # plain MLP of 4: n=8: 256 + 512 + 4*8*2*4 = 1024; n=4: 128 + 128 + 128 = 384
    assert flops.count(qwen2, stats).vision == 64 + 1024 + 2 * 384
    assert flops.count(qwen2, stats).llm_prefill == counted.llm_prefill


def test_flops_hand_count_linear_sliding_and_gated_layers():
    """Qwen3.5's layers (a Gated DeltaNet layer, a full-attention one whose q projection carries a gate), a sliding
    layer's window, image runs attending both ways, and Gemma 3's one-matrix projector, against hand counts."""
    t = flops.LLMShape(width=4, heads=2, kv_heads=1, head_dim=2, mlp=5, vocab=7, layers=3, query_gate=True,
                       layer_kinds=("linear_attention", "full_attention", "sliding_attention"), window=2,
                       linear=flops.LinearAttentionShape(key_heads=1, value_heads=2, key_dim=2, value_dim=3, conv_kernel=4))
    # linear, n=3 (K=2, V'=6, 2K+V'=10): q,k,v 2*3*4*10=240, gate z 2*3*4*6=144, a,b 4*3*4*2=96, out 2*3*6*4=144;
    # convolution 2*3*4*10=240; delta rule 6*3*2*2*3=216; MLP 6*3*4*5=360
    assert flops.llm_layer_prefill_flops(t, 3, layer=0) == 240 + 144 + 96 + 144 + 240 + 216 + 360
    assert flops.llm_layer_decode_flops(t, 100, layer=0) == (240 + 144 + 96 + 144 + 240 + 216 + 360) // 3
    # gated full attention, n=3: q 2*3*4*8=192, o 2*3*4*4=96, k,v 4*3*4*1*2=96; 6 pairs x 4*2*2; MLP 360
    assert flops.llm_layer_prefill_flops(t, 3, layer=1) == 192 + 96 + 96 + 6 * 16 + 360
    # sliding (gated here too: 128 a token for q, k, v, o), window 2, n=4: pairs 1 + 2 + 2 + 2 = 7; a two-way run of
    # 3 adds 3 (each token with the later ones)
    assert flops.attention_pairs(4, 2) == 7 and flops.two_way_pairs([3, 1]) == 3
    assert flops.llm_layer_prefill_flops(t, 4, layer=2, runs=[3]) == 4 * 128 + (7 + 3) * 16 + 4 * 120
    # a decode token on the sliding layer attends over the window alone: 2 of its 9 entries
    assert flops.llm_layer_decode_flops(t, 9, layer=2) == 128 + 2 * 16 + 120
    gemma = flops.VisionShape(width=3, mlp=1, patch=1, channels=1, patches=16, projector_layers=1)
    assert flops.projector_flops(gemma, t, 4) == 4 * 2 * 3 * 4  # 4 pooled tokens, d_v 3 -> D 4


def test_bench_clis_on_tiny_qwen(tmp_path):
    """A saved Qwen2.5-VL folder loads by its model_type; synthetic 644 x 644 images: 23 x 23 = 529 tokens."""
    from conftest import qwen_model

    folder = tmp_path / "qwen"
    qwen_model("qwen2_5_vl").save_pretrained(folder)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(folder), "--methods", "divprune:budget=64,fastv:k=2,ratio=0.5", "--json", str(out),
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu"]) == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["visual_tokens_mean"] == 529
    assert results["divprune:budget=64"]["visual_tokens_max"] == 64
    assert results["divprune:budget=64"]["flops_ratio"] < results["fastv:k=2,ratio=0.5"]["flops_ratio"] < 1
    # the vision tower's FLOPs do not change with a stage-2 or 3 method
    assert len({r["flops"]["vision"] for r in results.values()}) == 1
    out = tmp_path / "generate.json"
    assert main(["bench-generate", "--model", str(folder), "--methods", "divprune:budget=64", "--batch-sizes", "1",
                 "--paths", "eager,static",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["path"], r["method"], r["visual_tokens_mean"]) for r in rows] == [
        (path, method, tokens) for path in ("eager", "static")
        for method, tokens in (("untouched", 529), ("divprune:budget=64", 64), ("untouched, again", 529))]


def test_qwen25_vl_7b_shape():
    from slimvlm.bench.shapes import MODEL_CLASSES, shape_config

    config = shape_config("qwen2.5-vl-7b")
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)]._from_config(config)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.29  # Qwen2.5-VL-7B-Instruct's 8.29B
    assert config.text_config.sliding_window is None  # use_sliding_window=False: stages 3-4 run on it
    from slimvlm.models import adapter_for

    tensors, span = adapter_for(model).synthetic_videos(2, 16, torch.Generator().manual_seed(0))
    assert span == 8 * 23 * 23  # --video-frames 16: 8 steps of 644-px frames, 529 tokens each
    assert tensors["video_grid_thw"].tolist() == [[8, 46, 46]] * 2 and tensors["second_per_grid_ts"].tolist() == [1.0, 1.0]


def test_the_token_ideal_is_the_untouched_llm_fed_as_many_tokens_as_text(tiny_dir, monkeypatch):
    """--ideal: per method, the untouched model's generate() on a text-only prompt as long as the reduced one, plus
    the untouched vision stages' time."""
    from slimvlm.bench import generate as bench

    model, _ = load_model(str(tiny_dir), torch.device("cpu"))
    inputs = synthetic_inputs(model, 2, 7)
    lengths = []
    timer = bench.time_generate

    def recording(model_, given, *args):
        lengths.append((given["input_ids"].shape[1], "pixel_values" in given))
        return timer(model_, given, *args)

    monkeypatch.setattr(bench, "time_generate", recording)
    rows = bench.bench_generate(model, [["divprune:budget=64"]], lambda b: inputs, [2], ["eager"], 3, warmup=0, repeats=1,
                                progress=False, ideal=True)
    full = inputs["input_ids"].shape[1]
    # untouched, divprune, its ideal, untouched again
    assert lengths == [(full, True), (full, True), (full - 576 + 64, False), (full, True)]
    untouched, divprune, again = rows
    assert untouched.ideal_ttft_ms is None and again.ideal_ttft_ms is None
    assert divprune.ideal_ttft_ms > untouched.vision_ms and divprune.ideal_total_ms > divprune.ideal_ttft_ms
