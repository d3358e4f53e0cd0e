"""InternVL (InternViT tiles, pixel shuffle, a Qwen2 LM) on a tiny random InternVLForConditionalGeneration: the
no-op is exact (logits and text, dynamic and static cache, left padding, an image of several tiles), every
method runs batched as one by one or is refused by name, remove() restores the model; then what is InternVL's
own: merged patches through the pixel shuffle (checked by hand), VisionZip on the shuffled tokens, MustDrop's
important set on them, per-tile budgets, and shape:internvl3-8b."""

import pytest
import torch

import slimvlm
from conftest import assert_remove_restores, assert_visual_tokens, remove_slimvlm, sharpened, visual_tokens_out
from slimvlm.methods.dymu import DyMU, calibrate_dymu
from slimvlm.registry import methods

IMAGE, START, END = 900, 901, 902  # <IMG_CONTEXT>, <img>, </img>
SIDE = 112  # px a tile: 8 x 8 patches of 14 px, shuffled into 4 x 4 = 16 tokens
TOKENS = 16
TILES = [3, 1]  # prompt 0: an image of 2 tiles and its thumbnail; prompt 1: an image of one tile

# every registered method, with settings that reduce something on 8 x 8-patch tiles
RUNS = {
    "none": "none",
    "random": "random:budget=6",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=6",
    "pool": "pool:budget=4",
    "tome": "tome:r=4",
    "visionzip": "visionzip:dominant=5,contextual=2",
    "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1",
    "fastv": "fastv:k=2,ratio=0.5",
    "dymu": "dymu:vtu=false",
}
REFUSED = {"vtu": (["tome:r=4", "vtu"], "vtu unmerges in the LLM.*nothing stays merged"),
           "llava-mini": ("llava-mini:budget=4", "llava-mini's modules are laid out on the vision config's patch grid")}


def internvl_model(seed: int = 0, **vision):
    """A tiny random InternVL, float32, SDPA: InternViT of 2 layers with q/k norms on 112-px tiles, a 4-layer
    Qwen2 LM whose attention is sharp enough that a wrong token shows in the logits."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=SIDE, patch_size=14, use_qk_norm=True), **vision)
    torch.manual_seed(seed)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, image_seq_length=TOKENS)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # layer scale of 1, not the init's 0.1, so that the tower's layers count
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
    return sharpened(model).eval()


@pytest.fixture(scope="module")
def tiny_internvl():
    model = internvl_model()
    yield model
    remove_slimvlm(model)


@pytest.fixture
def fresh(tiny_internvl):
    yield tiny_internvl
    remove_slimvlm(tiny_internvl)


@pytest.fixture(scope="module")
def thresholds(tiny_internvl):
    crops = torch.randn(16, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    return calibrate_dymu(tiny_internvl, [crops], target=40, batch_size=16, progress=False)


def internvl_batch(tiles=TILES, seed: int = 0) -> dict:
    """Left-padded prompts of different lengths, prompt i an image of tiles[i] tiles (<img>, 16 placeholders a
    tile, </img>), as the processor writes them; pixel_values every tile in prompt order."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(10, 800, (3 + 2 * i,), generator=generator).tolist() + [START] + [IMAGE] * TOKENS * count
            + [END] + torch.randint(10, 800, (5,), generator=generator).tolist() for i, count in enumerate(tiles)]
    length = max(map(len, rows))
    return {
        "input_ids": torch.tensor([[0] * (length - len(row)) + row for row in rows]),
        "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
        "pixel_values": torch.randn(sum(tiles), 3, SIDE, SIDE, generator=generator),
    }


def internvl_select(inputs: dict, index: int, tiles=TILES) -> dict:
    """One prompt of a batch, alone, without padding, with its own tiles."""
    keep = inputs["attention_mask"][index].bool()
    first = sum(tiles[:index])
    return {"input_ids": inputs["input_ids"][index : index + 1, keep],
            "attention_mask": inputs["attention_mask"][index : index + 1, keep],
            "pixel_values": inputs["pixel_values"][first : first + tiles[index]]}


def generate(model, inputs: dict, static: bool = False, new: int = 5) -> torch.Tensor:
    """Greedy text, `new` tokens (the tiny model may end a prompt at once)."""
    cache = {"cache_implementation": "static"} if static else {}
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **cache)[:, -new:]


def spec_of(name, thresholds):
    return DyMU(thresholds=thresholds, vtu=False) if name == "dymu" else RUNS[name]


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


def test_none_gives_the_untouched_logits_and_text(fresh):
    model = fresh
    inputs = internvl_batch()
    assert inputs["attention_mask"][:, 0].tolist() == [1, 0]  # left padding
    with torch.no_grad():
        reference = model(**inputs).logits
        texts = [generate(model, inputs, static) for static in (False, True)]
        with slimvlm.apply(model, "none") as handle:
            out = model(**inputs)
            assert type(out).__name__ == "InternVLCausalLMOutputWithPast"
            assert_visual_tokens(out, [TOKENS] * sum(TILES))
            assert handle.stats.visual_tokens == [TOKENS] * sum(TILES)  # each tile is an item
            for static, text in zip((False, True), texts):
                assert torch.equal(generate(model, inputs, static), text)
    valid = inputs["attention_mask"].bool()
    assert (out.logits - reference)[valid].abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(RUNS))
def test_batched_equals_one_by_one(fresh, thresholds, name):
    model = fresh
    inputs = internvl_batch()
    singles = [internvl_select(inputs, i) for i in range(len(TILES))]
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)) as handle:
        batched = model(**inputs).logits[:, -1]
        counts = handle.stats.visual_tokens
        generated = generate(model, inputs)
        for i, single in enumerate(singles):
            torch.testing.assert_close(model(**single).logits[0, -1], batched[i], atol=1e-5, rtol=1e-5)
            first = sum(TILES[:i])
            assert handle.stats.visual_tokens == counts[first : first + TILES[i]]
            assert generate(model, single).tolist() == generated[i : i + 1].tolist()
    assert len(counts) == sum(TILES) and all(0 < count <= TOKENS for count in counts)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_act_on_internvl_is_refused_by_name(fresh, name):
    from slimvlm.registry import families_taking

    spec, message = REFUSED[name]
    with pytest.raises(slimvlm.SlimVLMError, match=message):
        slimvlm.apply(fresh, spec)
    assert "forward" not in fresh.__dict__
    assert "InternVL" in families_taking(name)[1]  # `slimvlm methods` lists it as refused


def test_dymus_virtual_unmerging_is_refused_with_the_fix(fresh, thresholds):
    with pytest.raises(slimvlm.SlimVLMError, match=r"dymu unmerges in the LLM.*dymu:vtu=false"):
        slimvlm.apply(fresh, DyMU(thresholds=thresholds))


def test_remove_restores_the_model_exactly(fresh):
    """After methods of every stage ran (generate() on both caches), remove() leaves the untouched model: its logits
    bit for bit, no forward of slimvlm's, only the hooks the model had (transformers' own output capture)."""
    model = fresh
    inputs = internvl_batch()
    specs = ("tome:r=4", "visionzip:dominant=5,contextual=2", "mustdrop:layers=0", "pool:budget=4")
    assert_remove_restores(model, inputs, specs, lambda: (generate(model, inputs), generate(model, inputs, static=True)))


# ---- stage 1 and the pixel shuffle ------------------------------------------------------------------------------
def test_merged_patches_go_through_the_pixel_shuffle_as_their_tokens(tiny_internvl):
    """By hand, on one 8 x 8-patch tile whose patch p has the feature p (every channel): merge patch 9 into 0
    (unit 0: patches 0, 1, 8, 9), 27 into 18 (unit 5: 18, 19, 26, 27), and 4 into 3 (units 1 and 2). The shuffle
    gets each patch with its token's mean, so unit 0 reads [4.5, 1, 8, 4.5], unit 5 [22.5, 19, 26, 22.5], unit 1
    (2, 3, 10, 11) [2, 3.5, 10, 11], unit 2 (4, 5, 12, 13) [3.5, 5, 12, 13], and the rest their own patches."""
    from slimvlm.models.internvl import InternVLAdapter
    from slimvlm.tokens import VisualTokens

    adapter = InternVLAdapter(tiny_internvl)
    adapter.projector = torch.nn.Identity()  # the shuffle's output itself
    width = tiny_internvl.config.vision_config.hidden_size
    features = torch.cat([torch.tensor([-1.0]), torch.arange(64.0)])[None, :, None].expand(1, 65, width)
    tokens = VisualTokens.from_patches(features, (8, 8), has_cls=True)
    assign = torch.arange(65)
    for patch, into in ((9, 0), (27, 18), (4, 3)):
        assign[patch + 1] = into + 1  # token 0 is the class token
    merged = tokens.regroup(assign[None], 65)
    assert merged.host_counts() == [62]
    units = adapter.project(merged)
    blocks = units.x[0].view(TOKENS, 4, width)  # each unit: its 4 patches' features side by side
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))  # every channel of a patch alike
    got = blocks[..., 0]
    assert got[0].tolist() == [4.5, 1, 8, 4.5]
    assert got[5].tolist() == [22.5, 19, 26, 22.5]
    assert got[1].tolist() == [2, 3.5, 10, 11]
    assert got[2].tolist() == [3.5, 5, 12, 13]
    assert got[15].tolist() == [54, 55, 62, 63]
    assert units.grid == (4, 4) and units.host_counts() == [TOKENS]


def test_stage_1_runs_per_tile_and_the_llm_gets_every_tiles_tokens(fresh):
    model = fresh
    with torch.no_grad(), slimvlm.apply(model, "tome:r=4") as handle:
        model(**internvl_batch())
    tiles = sum(TILES)
    assert handle.stats.vision_tokens == [[65] * tiles, [61] * tiles]  # r = 4 a layer, 64 patches and the class token
    assert handle.stats.visual_tokens == [TOKENS] * tiles  # merges undone before the shuffle
    assert handle.stats.projector_tokens == [TOKENS] * tiles


def test_visionzip_keeps_the_models_own_shuffled_tokens(fresh):
    """Dominant tokens are shuffled tokens kept whole: each is one of the untouched model's image features of its
    tile, chosen by the class token's attention to its patches."""
    model = fresh
    inputs = internvl_batch()
    with torch.no_grad():
        untouched = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (tiles, 16, D)
        with slimvlm.apply(model, "visionzip:dominant=5,contextual=2") as handle:
            out = model(**inputs)
    assert handle.stats.visual_tokens == [7] * sum(TILES)
    assert handle.stats.projector_tokens == [TOKENS] * sum(TILES)
    for tile, kept in enumerate(visual_tokens_out(out)):  # 7 per tile: no padding where 5.17 pads them
        distance = torch.cdist(kept[:5], untouched[tile])  # dominant tokens first, in spatial order
        assert (distance.min(dim=1).values < 1e-5).all()
        assert distance.argmin(dim=1).tolist() == sorted(distance.argmin(dim=1).tolist())


def test_mustdrops_important_set_lands_on_the_shuffled_tokens(fresh):
    """A shuffled token is in the important set where any of its 4 patches is."""
    model = fresh
    spec = "mustdrop:lsm=false,global_thr=1,individual_thr=1,layers=0,output_cache=false"
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        model(**internvl_batch())
        method = handle.methods[0]
        moved = handle.runtime.session.tokens.patches_from_views(method._important)
    patches = method._important.view(-1, 4, 2, 4, 2)  # (tiles, unit row, row in unit, unit col, col in unit)
    assert torch.equal(moved, patches.any(dim=4).any(dim=2).flatten(1))
    assert method._important.sum(dim=1).tolist() == [6] * sum(TILES)  # ceil(8% of 64) patches a tile
    important = moved.sum(dim=1).tolist()
    assert [layers[1] for layers in handle.stats.kv_visual_entries] == [
        sum(important[sum(TILES[:i]) : sum(TILES[: i + 1])]) for i in range(len(TILES))]


@pytest.mark.parametrize("spec, expected", [("divprune:budget=6", 6), ("pool:budget=4", 4), ("uniform:ratio=0.25", 4)])
def test_stage_2_budgets_are_per_tile(fresh, spec, expected):
    with torch.no_grad(), slimvlm.apply(fresh, spec) as handle:
        fresh(**internvl_batch())
    assert handle.stats.visual_tokens == [expected] * sum(TILES)


def test_a_tower_without_q_k_norms_and_with_its_final_norm_runs_exactly():
    """InternViT as InternVL3 ships it (no q/k norms) and without mean pooling: the final layernorm on the last
    layer's output, which the pixel shuffle then reads."""
    model = internvl_model(seed=1, use_qk_norm=False, use_mean_pooling=False)
    inputs = internvl_batch()
    with torch.no_grad():
        reference = model(**inputs).logits
        with slimvlm.apply(model, "none"):
            logits = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (logits - reference)[valid].abs().max().item() < 1e-5


def test_full_feature_selection_is_refused(tiny_internvl):
    import copy

    model = copy.deepcopy(tiny_internvl)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(slimvlm.SlimVLMError, match="use 'default'"):
        slimvlm.apply(model, "none")


def test_internvl3_8b_shape():
    """shape:internvl3-8b is InternVL3-8B's shape: its 7.94B parameters, 256 tokens a 448-px tile."""
    from slimvlm.bench.flops import projector_flops, shapes
    from slimvlm.bench.shapes import MODEL_CLASSES, shape_config
    from slimvlm.models import adapter_for

    config = shape_config("internvl3-8b")
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)]._from_config(config)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.94
    adapter = adapter_for(model)
    tensors, span = adapter.synthetic_images(2, torch.Generator().manual_seed(0))
    assert span == 256 and tensors["pixel_values"].shape == (2, 3, 448, 448)
    assert adapter.grid == (32, 32) and adapter.units == (16, 16) and adapter.tokens_per_image == 1024
    vision, llm = shapes(config)
    assert vision.patches == 1024 and projector_flops(vision, llm, 256) == 256 * (2 * 4096 * 3584 + 2 * 3584 * 3584)
