import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import slimvlm
from slimvlm.testbed.build import format_prompt, load, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, processor): a tiny random LLaVA (CLIP 336/14 -> 576 patches, Llama LM), float32, SDPA."""
    return load(tiny_dir)


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]


QUESTIONS = ["what colour is the circle ?", "is there a red square ? what is it", "what shape is it ?"]


def batch(processor, count: int = 2, seed: int = 0) -> dict:
    """A left-padded batch of `count` prompts of different lengths, one image each."""
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
    return processor(images=images(count, seed), text=prompts, return_tensors="pt", padding=True)


def select(inputs: dict, index: int) -> dict:
    """One sample of a batch, alone, with its padding removed."""
    keep = inputs["attention_mask"][index].bool()
    return {
        "input_ids": inputs["input_ids"][index : index + 1, keep],
        "attention_mask": inputs["attention_mask"][index : index + 1, keep],
        "pixel_values": inputs["pixel_values"][index : index + 1],
    }


def dymu_thresholds(model, target: int):
    """DyMU thresholds calibrated on 16 random crops of the model's crop size: enough for DyMU to run on it."""
    from slimvlm.methods.dymu import calibrate_dymu

    side = model.config.vision_config.image_size
    crops = torch.randn(16, 3, side, side, generator=torch.Generator().manual_seed(0))
    return calibrate_dymu(model, [crops], target=target, batch_size=16, progress=False)


def spy_on_segments(handle) -> list:
    """The (first, last) layers of each batch-1 prefill segment (runtime/segments.py) the handle's runtime runs
    from now on."""
    ran, run = [], handle.runtime.llm_prefill.segments.run
    handle.runtime.llm_prefill.segments.run = lambda *args: ran.append(args[1:3]) or run(*args)
    return ran


@contextlib.contextmanager
def causal_attention_calls():
    """Yields a list that receives, per SDPA call of many queries, ("causal" | "masked" | "full"): is_causal
    without a mask (flash attention on a GPU), a mask of many query rows, or neither (the vision encoder)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        if attn_mask is not None and attn_mask.shape[-2] > 1:
            calls.append("masked")
        elif attn_mask is None and query.shape[-2] > 1:  # (a decode step's GQA query groups count as rows here)
            calls.append("causal" if is_causal else "full")
        return sdpa(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def remove_slimvlm(model) -> None:
    """Leave a shared model untouched after a test, whatever the test left applied."""
    handle = getattr(model, "_slimvlm_handle", None)
    if handle is not None:
        handle.remove()


def assert_remove_restores(model, inputs: dict, specs, run) -> None:
    """Each of `specs` applied, `run()` (its generate() calls), removed: then the untouched model's logits on `inputs`
    bit for bit, no forward of slimvlm's on any module, and only the hooks the model had (transformers' own)."""
    def hooks():
        return [(list(module._forward_hooks.values()), list(module._forward_pre_hooks.values()))
                for module in model.modules()]

    with torch.no_grad():
        reference = model(**inputs).logits
        before = hooks()
        for spec in specs:
            handle = slimvlm.apply(model, spec)
            run()
            handle.remove()
        assert torch.equal(model(**inputs).logits, reference)
    assert hooks() == before
    assert not any("forward" in module.__dict__ for module in model.modules())


@pytest.fixture
def fresh(tiny):
    """The tiny model, guaranteed untouched after the test."""
    yield tiny
    remove_slimvlm(tiny[0])
    torch.manual_seed(0)


# ---- LLaVA-NeXT (AnyRes) -------------------------------------------------------------------------
NEXT_SIZES = [(100, 230), (200, 190)]  # (height, width): 1 x 2 tiles cut to 6 of 8 rows; 2 x 2 tiles, uncut


def next_model(folder):
    from transformers import LlavaNextForConditionalGeneration

    return load(folder, model_class=LlavaNextForConditionalGeneration)


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    from slimvlm.testbed.build import make_tiny_next

    return make_tiny_next(tmp_path_factory.mktemp("tiny_next"), seed=0, image_size=112)


@pytest.fixture(scope="session")
def tiny_next(tiny_next_dir):
    """(model, processor): a tiny random LLaVA-NeXT, crops of 112 px / patch 14 (8 x 8 patches), 2 or 4 tiles."""
    return next_model(tiny_next_dir)


def next_images(sizes=NEXT_SIZES, seed: int = 0, scale: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h * scale, w * scale, 3), dtype=np.uint8)) for h, w in sizes]


def next_batch(processor, sizes=NEXT_SIZES, scale: int = 1) -> dict:
    """A left-padded batch of prompts of different lengths, one image each, of different sizes (tile counts)."""
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(len(sizes))]
    return processor(images=next_images(sizes, scale=scale), text=prompts, return_tensors="pt", padding=True)


def next_select(inputs: dict, index: int) -> dict:
    """One sample of a LLaVA-NeXT batch, alone, without padding."""
    return {**select(inputs, index), "image_sizes": inputs["image_sizes"][index : index + 1]}


@pytest.fixture
def fresh_next(tiny_next):
    yield tiny_next
    remove_slimvlm(tiny_next[0])


# ---- LLaVA-OneVision (SigLIP without a class token, anyres_max_9) --------------------------------
OV_SIZES = [(100, 60), (150, 150)]  # (height, width): 2 x 1 tiles cut to 10 of 12 rows; 2 x 2 tiles, uncut
OV_RESIZED = (300, 250)  # 4 x 3 tiles: a 22 x 18 canvas, which anyres_max_9 resizes bilinearly to 19 x 16


@pytest.fixture(scope="session")
def tiny_ov_dir(tmp_path_factory):
    from slimvlm.testbed.build import make_tiny_onevision

    return make_tiny_onevision(tmp_path_factory.mktemp("tiny_ov"), seed=0)


@pytest.fixture(scope="session")
def tiny_ov(tiny_ov_dir):
    """(model, tokenizer): a tiny random LLaVA-OneVision, SigLIP crops of 84 px / patch 14 (6 x 6 patches),
    up to 4 x 4 tiles, a Qwen2 LM; float32, SDPA."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_ov_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_ov_dir, local_files_only=True)


@pytest.fixture
def fresh_ov(tiny_ov):
    yield tiny_ov
    remove_slimvlm(tiny_ov[0])


def ov_batch(model, tokenizer, sizes=OV_SIZES, per_prompt: list[int] | None = None) -> dict:
    """What LLaVA-OneVision's processor gives (its video part needs torchvision, so it is put together here): the
    PIL image processor's pixel_values, image_sizes and batch_num_images for one image per prompt (or
    per_prompt[i] images in prompt i, which the model then leaves untiled), and left-padded prompts of different
    lengths whose <image> becomes the placeholders the model's own packing gives their images."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from slimvlm.testbed.build import SPECIAL_TOKENS

    config = model.config
    side = config.vision_config.image_size
    processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                image_grid_pinpoints=config.image_grid_pinpoints)
    per_prompt = per_prompt or [1] * len(sizes)
    pictures, ends = next_images(sizes), np.cumsum(per_prompt).tolist()
    images = processor(images=[pictures[end - n : end] for n, end in zip(per_prompt, ends)], return_tensors="pt")
    with torch.no_grad():
        packed = model.model.get_image_features(images["pixel_values"], images["image_sizes"],
                                                batch_num_images=images["batch_num_images"]).pooler_output
    image = SPECIAL_TOKENS["image"]
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]).replace(image, "".join(image * len(features) for features in
                                                                                  packed[end - n : end]))
               for i, (n, end) in enumerate(zip(per_prompt, ends))]
    return {**tokenizer(prompts, return_tensors="pt", padding=True), **images}


def ov_select(inputs: dict, index: int) -> dict:
    """One sample of a LLaVA-OneVision batch, alone, without padding."""
    return {**next_select(inputs, index), "batch_num_images": inputs["batch_num_images"][index : index + 1]}


# ---- LLaVA-NeXT-Video (LLaVA-NeXT's images; videos whose frames are pooled 2 x 2) --------------------
NV_FRAMES = 3  # frames a video: 3 x 16 = 48 tokens on 8 x 8-patch frames


def nv_model(folder):
    """(model, tokenizer) of a folder make_tiny_next_video wrote, float32, SDPA, its LM's attention sharpened."""
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    model = LlavaNextVideoForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True)
    return sharpened(model).eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def sharpened(model):
    """The model with sharper LM attention: at the default init it is nearly uniform, and attention-ranked drops
    (fastv, mustdrop) take all or nothing, and a wrong position hardly shows. Queries and keys scaled by 8, where an
    LM norms them per head (Qwen3's q_norm, k_norm) by the norms (sharpen_norm)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attention = getattr(layer, "self_attn", None)
            if attention is None:  # a linear-attention layer of a hybrid LM (Qwen3.5): no queries and keys to scale
                continue
            if hasattr(attention, "q_norm"):
                sharpen_norm(attention.q_norm)
                sharpen_norm(attention.k_norm)
            else:
                attention.q_proj.weight.mul_(8)
                attention.k_proj.weight.mul_(8)
    return model


def sharpen_norm(norm) -> None:
    """A per-head norm's outputs times 8: its scale w times 8, or where it scales by 1 + w (Qwen3.5's, whose w starts at
    0: a vector of ones comes out as 1 + w), 1 + w' = 8 (1 + w)."""
    offset = float((norm(torch.ones_like(norm.weight)) - norm.weight).mean().round())  # 1 or 0
    norm.weight.mul_(8).add_(7 * offset)


@pytest.fixture(scope="session")
def tiny_nv_dir(tmp_path_factory):
    from slimvlm.testbed.build import make_tiny_next_video

    return make_tiny_next_video(tmp_path_factory.mktemp("tiny_nv"), seed=0)


@pytest.fixture(scope="session")
def tiny_nv(tiny_nv_dir):
    """(model, tokenizer): a tiny random LLaVA-NeXT-Video, crops and frames of 112 px / patch 14 (8 x 8 patches),
    frames average-pooled into 4 x 4 tokens."""
    return nv_model(tiny_nv_dir)


@pytest.fixture
def fresh_nv(tiny_nv):
    yield tiny_nv
    remove_slimvlm(tiny_nv[0])


def video_batch(model, tokenizer, samples: list[tuple[str, ...]], first: int = 0, sizes=NEXT_SIZES) -> dict:
    """What a LLaVA-NeXT-Video or LLaVA-OneVision processor gives (their video part needs torchvision, so it is put
    together here): left-padded prompts of different lengths, prompt i asking QUESTIONS[first + i] about
    samples[i]'s items in order ('image': sizes[(first + i + j) % len(sizes)] pixels, 'video': NV_FRAMES random
    frames), each placeholder expanded to the count the untouched model gives that item; pixel_values and
    image_sizes from the family's image processor (PIL), pixel_values_videos (videos, frames, C, H, W). Items
    depend on their prompt's index alone: video_batch(..., [samples[i]], first=i) is prompt i of the batch, alone."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from slimvlm.testbed.build import PROMPT, SPECIAL_TOKENS, VIDEO_TOKEN

    config = model.config
    side = config.vision_config.image_size
    onevision = isinstance(model, LlavaOnevisionForConditionalGeneration)
    images, videos = [], []
    for i, items in enumerate(samples, start=first):
        for j, kind in enumerate(items):
            if kind == "image":
                images += next_images([sizes[(i + j) % len(sizes)]], seed=10 * i + j)
            else:
                videos.append(torch.randn(NV_FRAMES, 3, side, side, generator=torch.Generator().manual_seed(10 * i + j)))
    inputs, counts = {}, {"image": [], "video": []}
    with torch.no_grad():
        if images:
            if onevision:
                processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                            image_grid_pinpoints=config.image_grid_pinpoints)
            else:
                processor = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                                       image_grid_pinpoints=config.image_grid_pinpoints)
            inputs.update(processor(images=images, return_tensors="pt"))
            packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
            counts["image"] = [len(features) for features in packed]
        if videos:
            inputs["pixel_values_videos"] = torch.stack(videos)
            pooled = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # 5.17: per video
            counts["video"] = [features.numel() // config.text_config.hidden_size for features in pooled]
            if onevision and counts["video"][0] % NV_FRAMES == 0:  # 5.17 adds a video's newline in forward, not here
                counts["video"] = [count + 1 for count in counts["video"]]
    token = {"image": SPECIAL_TOKENS["image"], "video": VIDEO_TOKEN}
    taken = {"image": iter(counts["image"]), "video": iter(counts["video"])}
    prompts = [PROMPT.format(images="".join(token[kind] * next(taken[kind]) for kind in items),
                             question=QUESTIONS[i % len(QUESTIONS)]) for i, items in enumerate(samples, start=first)]
    return {**tokenizer(prompts, return_tensors="pt", padding=True), **inputs}


def video_batched_as_one_by_one(model, tokenizer, spec, samples: list[tuple[str, ...]]) -> tuple[list[int], list[int]]:
    """Under `spec`, a video_batch of `samples` gives each prompt the last logits and greedy text it gets alone,
    and each item the tokens; returns (each item's visual tokens, each prompt's visual cache entries at the
    last layer)."""
    inputs = video_batch(model, tokenizer, samples)
    singles = [video_batch(model, tokenizer, [samples[i]], first=i) for i in range(len(samples))]
    new = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)  # the tiny model may end a prompt at once
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        batched = model(**inputs).logits[:, -1]
        counts = handle.stats.visual_tokens
        kept = [layers[-1] for layers in handle.stats.kv_visual_entries]
        generated = model.generate(**inputs, **new)[:, -5:]
        first = 0
        for i, single in enumerate(singles):
            torch.testing.assert_close(model(**single).logits[0, -1], batched[i], atol=1e-5, rtol=1e-5)
            assert handle.stats.visual_tokens == counts[first : first + len(samples[i])]
            first += len(samples[i])
            assert model.generate(**single, **new)[0, -5:].tolist() == generated[i].tolist()
    return counts, kept


# ---- Qwen2-VL / Qwen2.5-VL (M-RoPE, dynamic resolution) --------------------------------------------
QWEN_GRIDS = [(1, 8, 12), (1, 8, 8)]  # (t, h, w) patches: 24 and 16 tokens (2 x 2 patches each)
QWEN_IDS = dict(image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903)


def qwen_model(family: str, seed: int = 0, **text_options):
    """A tiny random Qwen2-VL ('qwen2_vl'), Qwen2.5-VL ('qwen2_5_vl'), Qwen3-VL ('qwen3_vl', 'qwen3_vl_moe') or Qwen3.5
    ('qwen3_5'), float32, SDPA: a 4-layer M-RoPE LM (mrope_section sums to head_dim / 2) whose attention is sharp enough
    that a wrong position shows in the logits; 2.5 with windows of 2 x 2 tokens and full attention in blocks 1 and 3; 3
    with 16-px patches, interleaved M-RoPE and DeepStack features from ViT blocks 0, 1 and 2 added to LM layers 0, 1 and
    2 (so a drop at layer 2 has features added before and after it); 3.5 with 16-px patches, no DeepStack, and three
    linear-attention LM layers before one of full attention (with a quarter of each head rotated). text_options: the
    LM config's own, over these (num_hidden_layers, Qwen3.5's full_attention_interval)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    text.update(text_options)
    patches = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=2)
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2,
                                                                    **patches), **QWEN_IDS)
        model_class = Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1, 3],
            **patches), **QWEN_IDS)
        model_class = Qwen2_5_VLForConditionalGeneration
    elif family.startswith("qwen3_5"):  # Qwen3.5: Qwen3-VL's vision without DeepStack; LM layers linear x 3, full
        from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                                  Qwen3_5MoeForConditionalGeneration)

        text = dict(text, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                               "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5,
                                                               "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                      **{**patches, "patch_size": 16})
        config_class, model_class = Qwen3_5Config, Qwen3_5ForConditionalGeneration
        if family == "qwen3_5_moe":  # 4 experts, 2 a token, and a shared one
            text = dict(text, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2)
            config_class, model_class = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
        config = config_class(text_config=text, vision_config=vision, **QWEN_IDS)
    else:  # Qwen3-VL, or with 'qwen3_vl_moe' its mixture of experts (4 experts, 2 a token)
        text = dict(text, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1, 2], **{**patches, "patch_size": 16})
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        if family == "qwen3_vl_moe":
            text = dict(text, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
            config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
        config = config_class(text_config=text, vision_config=vision, **QWEN_IDS)
    # sharper attention: at the default init it is nearly uniform and positions hardly matter
    return sharpened(model_class._from_config(config, attn_implementation="sdpa").eval())


QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session", params=QWEN_FAMILIES)
def tiny_qwen(request):
    return qwen_model(request.param)


@pytest.fixture
def fresh_qwen(tiny_qwen):
    yield tiny_qwen
    remove_slimvlm(tiny_qwen)


QWEN_VIDEO_GRIDS = [(12, 2, 4), (4, 4, 4)]  # also 24 and 16 tokens; the first runs 12 temporal steps, so its temporal
# positions go past the text after it (which starts past its height and width alone), on both families
QWEN_SECONDS = [1.0, 2.0]  # Qwen2.5-VL: each video's seconds per temporal step (its positions' time spacing)
QWEN_KINDS = {"image": ("pixel_values", "image_grid_thw", 1), "video": ("pixel_values_videos", "video_grid_thw", 2)}


def qwen_batch(config, grids=None, seed: int = 0, kind: str = "image") -> dict:
    """Left-padded prompts of different lengths, one image (or video) each: qwen_prompts."""
    grids = grids or (QWEN_GRIDS if kind == "image" else QWEN_VIDEO_GRIDS)
    return qwen_prompts(config, [[(kind, grid)] for grid in grids], seed)


def qwen_prompts(config, prompts: list[list[tuple[str, tuple[int, int, int]]]], seed: int = 0) -> dict:
    """Left-padded prompts of different lengths with their items ('image' or 'video', (t, h, w) patches) in
    order, as the processor lays them out: text, then per item <|vision_start|>, t h w / 4 placeholders,
    <|vision_end|> and two text tokens, then text; each kind's patches (sum t h w, C T P P) and grids in prompt
    order; on Qwen2.5-VL the videos' second_per_grid_ts (QWEN_SECONDS in turn)."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    inputs = {}
    for kind, (pixels, grids, _) in QWEN_KINDS.items():
        own = [grid for items in prompts for item, grid in items if item == kind]
        if own:
            inputs[pixels] = torch.randn(sum(t * h * w for t, h, w in own), width, generator=generator)
            inputs[grids] = torch.tensor(own)
    rows = []
    for index, items in enumerate(prompts):
        text = torch.randint(10, 800, (3 + 2 * index + 6 + 2 * (len(items) - 1),), generator=generator).tolist()
        row = text[:3]
        for at, (kind, (t, h, w)) in enumerate(items):
            row += qwen_placeholders(config, kind, (t, h, w))
            row += text[3 + 2 * at : 5 + 2 * at] if at < len(items) - 1 else text[3 + 2 * at :]
        rows.append(row)
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    videos = inputs.get("video_grid_thw")
    if videos is not None and config.model_type == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([QWEN_SECONDS[i % len(QWEN_SECONDS)] for i in range(len(videos))])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
        **inputs,
        "mm_token_type_ids": (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long(),
    }


QWEN3_TIMESTAMP = 810  # Qwen3-VL: the text token standing for a video frame's timestamp (step i: 810 + i)


def qwen_placeholders(config, kind: str, grid: tuple[int, int, int]) -> list[int]:
    """An item's tokens as the processor writes them: <|vision_start|>, t h w / 4 placeholders, <|vision_end|>; on
    Qwen3-VL a video's each temporal step so, after its timestamp (text, QWEN3_TIMESTAMP + step)."""
    t, h, w = grid
    start, end = config.vision_start_token_id, config.vision_end_token_id
    if kind == "image":
        return [start] + [config.image_token_id] * (t * h * w // 4) + [end]
    if not config.model_type.startswith(("qwen3_vl", "qwen3_5")):
        return [start] + [config.video_token_id] * (t * h * w // 4) + [end]
    return [token for step in range(t) for token in [QWEN3_TIMESTAMP + step, start] + [config.video_token_id] * (h * w // 4) + [end]]


def qwen_select(inputs: dict, index: int) -> dict:
    """One sample of a Qwen batch, alone, without padding: its own items of each kind."""
    keep = inputs["attention_mask"][index].bool()
    out = {name: inputs[name][index : index + 1, keep] for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pixels, grids, type_id in QWEN_KINDS.values():
        if grids not in inputs:
            continue
        counts = (inputs["mm_token_type_ids"] == type_id).sum(dim=1).tolist()
        before, own = sum(counts[:index]), counts[index]
        ends = (inputs[grids].prod(dim=1) // 4).cumsum(0).tolist()
        items = [item for item, end in enumerate(ends) if before < end <= before + own]
        if not items:
            continue
        patches = inputs[grids].prod(dim=1).tolist()
        start = sum(patches[: items[0]])
        out[pixels] = inputs[pixels][start : start + sum(patches[item] for item in items)]
        out[grids] = inputs[grids][items]
        if grids == "video_grid_thw" and "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][items]
    return out


def visual_tokens_out(output, modality: str = "image") -> list[torch.Tensor]:
    """Each item's visual tokens the output carries, from `{modality}_outputs` (5.2x) or `{modality}_hidden_states`
    (5.17: one tensor, padded: every row whole, for items of equal length)."""
    if f"{modality}_outputs" in output.keys():
        return list(output[f"{modality}_outputs"].pooler_output)
    return list(output[f"{modality}_hidden_states"])


def assert_visual_tokens(output, counts: list[int], modality: str = "image") -> None:
    """The output carries the visual tokens each image (or video) gave the LLM, as the installed release names
    them: `image_outputs` (5.2x: each image's tokens) or `image_hidden_states` (5.17: one tensor, padded)."""
    if f"{modality}_outputs" in output.keys():
        assert [len(item) for item in output[f"{modality}_outputs"].pooler_output] == counts
    else:
        assert output[f"{modality}_hidden_states"].shape[:2] == (len(counts), max(counts))


# ---- Gemma 3 (SigLIP, pooled projector, sliding-window LM with two-way image blocks) --------------------------
GEMMA3_IDS = dict(image_token_index=900, boi_token_index=901, eoi_token_index=902)
GEMMA3_SIDE, GEMMA3_TOKENS = 32, 16  # px an image: 8 x 8 patches of 4 px, pooled 2 x 2 into 4 x 4 = 16 tokens


def gemma3_model(seed: int = 0, window: int = 8):
    """A tiny random Gemma 3, float32, SDPA: SigLIP of 2 layers (no head) on 32-px images, 16 tokens an image after
    the pooling, a 6-layer LM (5 sliding-window layers of `window`, by default 8, shorter than every test prompt, then
    a global one); its projection drawn at random (the init's is zero: every image would give zeros) and its attention
    sharpened as sharpened() does (queries and keys times 8, here through Gemma's (1 + w) q/k norms), so that a wrong
    mask or position shows in the logits."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=window, query_pre_attn_scalar=16,
                max_position_embeddings=2048, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=GEMMA3_SIDE, patch_size=4, vision_use_head=False)
    torch.manual_seed(seed)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS, **GEMMA3_IDS)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
        for layer in model.model.language_model.layers:  # (1 + w) scaled by 8: 8 + 8w - 1
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.mul_(8).add_(7)
    return model


@pytest.fixture(scope="session")
def tiny_gemma3():
    return gemma3_model()


@pytest.fixture
def fresh_gemma3(tiny_gemma3):
    yield tiny_gemma3
    remove_slimvlm(tiny_gemma3)


def gemma3_batch(images=(1, 1), seed: int = 0, token_types: bool = True) -> dict:
    """Left-padded prompts of different lengths (all longer than the sliding window), prompt i with images[i] images,
    each as the processor writes it (<start_of_image>, 16 placeholders, <end_of_image>) between text; pixel_values
    every image in prompt order; token_type_ids (1 at the placeholders) unless token_types is False."""
    generator = torch.Generator().manual_seed(seed)
    start, image, end = GEMMA3_IDS["boi_token_index"], GEMMA3_IDS["image_token_index"], GEMMA3_IDS["eoi_token_index"]
    rows = []
    for index, count in enumerate(images):
        row = torch.randint(10, 800, (3 + 2 * index,), generator=generator).tolist()
        for _ in range(count):
            row += [start] + [image] * GEMMA3_TOKENS + [end] + torch.randint(10, 800, (4,), generator=generator).tolist()
        rows.append(row)
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    inputs = {"input_ids": input_ids,
              "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
              "pixel_values": torch.randn(sum(images), 3, GEMMA3_SIDE, GEMMA3_SIDE, generator=generator)}
    if token_types:
        inputs["token_type_ids"] = (input_ids == image).long()
    return inputs


def gemma3_select(inputs: dict, index: int, images=(1, 1)) -> dict:
    """One prompt of a Gemma 3 batch, alone, without padding, with its own images."""
    keep = inputs["attention_mask"][index].bool()
    out = {name: inputs[name][index : index + 1, keep] for name in ("input_ids", "attention_mask", "token_type_ids")
           if name in inputs}
    first = sum(images[:index])
    return {**out, "pixel_values": inputs["pixel_values"][first : first + images[index]]}
