"""LLaVA-Mini's inference modules: query compression and modality pre-fusion at stage 2."""

import math

import pytest
import torch

import slimvlm
from conftest import batch, select
from slimvlm.bench import flops
from slimvlm.errors import SlimVLMError
from slimvlm.methods.llava_mini import (LlavaMini, cell_grid, patch_cells, prefusion_sequence, projector_signature,
                                         sincos_2d, with_compressed)
from slimvlm.tokens import VisualTokens


def _labels(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


def test_sincos_2d_on_a_hand_example():
    s1, c1 = math.sin(1.0), math.cos(1.0)
    # width 4: one frequency (1) per half; patch (r, c) -> [sin r, cos r, sin c, cos c], raster order
    expected = torch.tensor([[0, 1, 0, 1], [0, 1, s1, c1], [s1, c1, 0, 1], [s1, c1, s1, c1]], dtype=torch.float32)
    assert torch.allclose(sincos_2d(4, (2, 2)), expected, atol=1e-6)
    # width 8: frequencies 1 and 1/100 per half: [sin r, sin r/100, cos r, cos r/100, (same for c)]
    table = sincos_2d(8, (2, 2))
    r, c = 1, 0  # patch 2
    want = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100), math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    assert torch.allclose(table[2], torch.tensor(want), atol=1e-6)
    with pytest.raises(SlimVLMError):
        sincos_2d(6, (2, 2))


def test_prefusion_sequence_on_a_hand_example():
    """Per sample: its images' real tokens in its own image order, then its text tokens, left-aligned."""
    # three images with 2, 1 and 3 real tokens (feature = 10 * image + token + 1, padding 0)
    x = torch.tensor([[11, 12, 0], [21, 0, 0], [31, 32, 33]], dtype=torch.float32)[..., None]
    counts = torch.tensor([2, 1, 3])
    text_embeds = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float32)[..., None]
    text = torch.tensor([[False, True, False, True], [True, True, True, False]])
    # sample 0 has image 2; sample 1 has images 1 then 0
    sequence, place, visual_place, lengths = prefusion_sequence(text_embeds, text, x, counts, [[2], [1, 0]])
    assert lengths == [5, 6]
    assert sequence[..., 0].tolist() == [[31, 32, 33, 2, 4, 0], [21, 11, 12, 5, 6, 7]]
    assert place.tolist() == [[6, 3, 6, 4], [3, 4, 5, 6]]  # 6: not a text token here
    # per image (batch order): where its tokens sit in its sample's row, 6 past its count
    assert visual_place.tolist() == [[1, 2, 6], [0, 6, 6], [0, 1, 2]]


def test_with_compressed_on_a_hand_example():
    """Each image's real tokens, then its compressed ones, then padding."""
    x = torch.tensor([[11, 12, 0], [21, 0, 0]], dtype=torch.float32)[..., None]
    full = VisualTokens(x=x, size=(x[..., 0] > 0).float(), origin=torch.zeros(2, 3, dtype=torch.long),
                        patch_to_token=torch.zeros(2, 3, dtype=torch.long), grid=(1, 3), has_cls=False)
    compressed = torch.tensor([[[1], [2]], [[3], [4]]], dtype=torch.float32)
    joined, counts = with_compressed(full, compressed)
    assert joined[..., 0].tolist() == [[11, 12, 1, 2, 0], [21, 3, 4, 0, 0]]
    assert counts.tolist() == [4, 3]


def test_cells_split_the_grid_as_pool_does():
    assert cell_grid(1) == (1, 1) and cell_grid(4) == (2, 2) and cell_grid(6) == (2, 3) and cell_grid(7) == (1, 7)
    # a 4 x 4 grid into 2 x 2 cells: each quadrant one cell, raster order
    assert patch_cells((4, 4), 4).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # 3 x 3 into 2 x 2: bins of rows (0, 0, 1) and columns (0, 0, 1), as adaptive pooling's floor bins
    assert patch_cells((3, 3), 4).view(3, 3).tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3]]


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_budget_gives_that_many_tokens_per_image(fresh, budget):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad(), slimvlm.apply(model, f"llava-mini:budget={budget},layers=2") as handle:
        output = model(**inputs)
        assert handle.stats.visual_tokens == [budget, budget]
        assert all(all(p == -1 for p in row) for row in handle.stats.sources)
    assert output.logits.shape[1] == inputs["input_ids"].shape[1] - 576 + budget
    assert torch.isfinite(output.logits).all()


def test_prefusion_layers_are_in_the_stats_and_the_flops(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    inputs["attention_mask"][1, 0] = 0  # sample 1 without its bos: one text token fewer than it has
    text = ((inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()).sum(dim=1).tolist()
    assert text == [9, 11]
    with torch.no_grad(), slimvlm.apply(model, "llava-mini:budget=2,layers=3") as handle:
        model(**inputs)
        stats = handle.stats
    assert stats.fusion_tokens == [[576 + 2 + text[0], 576 + 2 + text[1]]] * 3  # every patch, the compressed, the text
    _, llm = flops.shapes(model.config)
    counted = flops.count(model.config, stats)
    assert counted.fusion == 3 * sum(flops.llm_layer_prefill_flops(llm, 576 + 2 + n) for n in text)
    assert counted.prefill == counted.vision + counted.projector + counted.fusion + counted.llm_prefill
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=2") as handle:
        model(**inputs)
        assert handle.stats.fusion_tokens == [] and flops.count(model.config, handle.stats).fusion == 0


def test_batched_generate_equals_one_by_one(fresh):
    model, processor = fresh
    inputs = batch(processor, 3, seed=1)
    method = LlavaMini(budget=4, layers=2, init="random")
    with torch.no_grad(), slimvlm.apply(model, method) as handle:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert handle.stats.visual_tokens == [4, 4, 4]
        for index in range(3):
            one = select(inputs, index)
            alone = model.generate(**one, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
            assert torch.equal(batched.sequences[index, inputs["input_ids"].shape[1]:], alone.sequences[0, one["input_ids"].shape[1]:])
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)


def test_fuse_changes_the_text_and_gradients_reach_the_modules(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    method = LlavaMini(budget=4, layers=2, init="random")
    method.build(model)
    seen = {}
    original_fuse = method.fuse

    def fuse(text_embeds, tokens, context):
        out = original_fuse(text_embeds, tokens, context)
        seen["before"], seen["after"], seen["context"] = text_embeds.detach(), out[0].detach(), context
        return out

    method.fuse = fuse
    labels = _labels(model, inputs)
    labels[:, :-2] = -100  # the answer: the last two tokens (left padding)
    with slimvlm.apply(model, method):
        loss = model(**inputs, labels=labels).loss
    context = seen["context"]
    text = (context.input_ids != model.config.image_token_id) & context.attention_mask.bool()
    changed = (seen["after"] - seen["before"]).abs().amax(dim=-1) > 0
    # every unlabelled text token pre-fused; the answer, placeholders and padding untouched
    assert torch.equal(changed, text & (labels == -100))
    loss.backward()
    modules = method.modules
    assert modules.queries.grad is not None and modules.queries.grad.abs().sum() > 0
    for layer in modules.prefusion:
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0
    assert modules.attention.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_labelled_tokens_are_left_out_of_the_prefusion(fresh):
    """A labelled token keeps its raw embedding, and the tokens after it are fused as if it were
    not in the sequence at all (the authors treat labelled tokens as padding in pre-fusion)."""
    model, processor = fresh
    one = select(batch(processor, 1), 0)
    method = LlavaMini(budget=4, layers=2, seed=1, init="random")
    method.build(model)
    seen = []
    original_fuse = method.fuse

    def fuse(text_embeds, tokens, context):
        out = original_fuse(text_embeds, tokens, context)
        seen.append((text_embeds.detach(), out[0].detach()))
        return out

    method.fuse = fuse
    ids = one["input_ids"]
    length = ids.shape[1]
    k = length - 4  # a question token after the image, followed by unlabelled tokens
    assert int(ids[0, k]) != model.config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[0, k] = ids[0, k]
    labels[0, -1] = ids[0, -1]
    keep = torch.ones(length, dtype=torch.bool)
    keep[k] = False
    without = {"input_ids": ids[:, keep], "attention_mask": one["attention_mask"][:, keep], "pixel_values": one["pixel_values"]}
    labels_without = labels[:, keep]
    with torch.no_grad(), slimvlm.apply(model, method):
        model(**one, labels=labels)
        model(**without, labels=labels_without)
        model(**one)  # no labels (inference): every text token is fused
    (raw, fused), (_, fused_without), (_, fused_all) = seen
    assert torch.equal(fused[0, k], raw[0, k]) and torch.equal(fused[0, -1], raw[0, -1])
    assert torch.allclose(fused[0, keep], fused_without[0], atol=1e-5)
    assert not torch.allclose(fused[0, k + 1], fused_all[0, k + 1])  # k would have been seen otherwise
    assert torch.allclose(fused[0, :k], fused_all[0, :k], atol=1e-5)
    with pytest.raises(SlimVLMError):
        with torch.no_grad(), slimvlm.apply(model, method):
            model(**one, labels=labels[:, 1:])


def test_prefusion_without_a_mask_equals_eager_attention_with_one(fresh):
    """SDPA runs the pre-fusion causal with no mask (padding comes last in every row); eager
    attention gets an explicit causal mask: the two agree, padding and all."""
    model, processor = fresh
    inputs = batch(processor, 3, seed=2)
    inputs["attention_mask"][0, :5] = 0  # more left padding in one row: rows of different lengths
    method = LlavaMini(budget=2, layers=2, seed=4, init="random")
    logits = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        assert method.build(model).attention_implementation == implementation
        with torch.no_grad(), slimvlm.apply(model, method):
            logits[implementation] = model(**inputs).logits
    model.set_attn_implementation("sdpa")
    assert torch.allclose(logits["sdpa"][:, -3:], logits["eager"][:, -3:], atol=1e-5)  # (padded positions differ by kernel)


def test_fusion_depends_on_the_image(fresh):
    model, processor = fresh
    a, b = batch(processor, 1, seed=0), batch(processor, 1, seed=5)
    method = LlavaMini(budget=1, layers=1, init="random")
    with torch.no_grad(), slimvlm.apply(model, method):
        first = model(**a).logits[:, -1]
        b = dict(b, input_ids=a["input_ids"], attention_mask=a["attention_mask"])
        second = model(**b).logits[:, -1]
    assert not torch.allclose(first, second)


def test_save_and_load_round_trip(fresh, tmp_path):
    model, processor = fresh
    inputs = batch(processor, 2)
    trained = LlavaMini(budget=4, layers=2, seed=3, init="random")
    with torch.no_grad(), slimvlm.apply(model, trained):
        with torch.no_grad():
            trained.modules.queries.add_(0.5)  # any change from the seeded init
        reference = model(**inputs).logits
    trained.save(tmp_path)
    assert (tmp_path / "llava_mini.safetensors").is_file() and (tmp_path / "llava_mini.json").is_file()
    loaded = slimvlm.registry.build(f"llava-mini:weights={tmp_path}")
    assert (loaded.budget, loaded.layers) == (4, 2)
    with torch.no_grad(), slimvlm.apply(model, loaded):
        again = model(**inputs).logits
    assert torch.equal(reference, again)
    other = LlavaMini(budget=4, layers=2, seed=9, init="random")  # load() into a built instance
    other.build(model)
    other.load(tmp_path)
    with torch.no_grad(), slimvlm.apply(model, other):
        assert torch.equal(model(**inputs).logits, reference)


def test_projector_signature_on_a_hand_example():
    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.001, 2.0, 4.0]]))  # 1.001 is 1.0 in bfloat16
    # sign of weight i under hash k: bit 15 of i * (2654435761 + 2k): i = 1 -> 81006 (even, +),
    # i = 2 -> 162013 (odd, -), the same for k = 0..3: 1 + 2 - 4
    assert projector_signature(layer) == {"sums": [-1.0] * 4, "norm": math.sqrt(21)}


def test_modules_refuse_a_model_whose_projector_they_were_not_trained_with(fresh, tmp_path):
    model, processor = fresh
    inputs = batch(processor, 1)
    trained = LlavaMini(budget=2, layers=1)
    trained.build(model)
    trained.save(tmp_path)
    projector = model.model.multi_modal_projector
    with torch.no_grad(), slimvlm.apply(model, f"llava-mini:weights={tmp_path}"):
        model(**inputs)  # the model they were saved with
    original = {name: p.detach().clone() for name, p in projector.named_parameters()}
    try:
        with torch.no_grad():
            projector.to(torch.bfloat16).float()  # the same weights in another dtype: still accepted
        slimvlm.apply(model, f"llava-mini:weights={tmp_path}").remove()
        with torch.no_grad():
            for p in projector.parameters():
                p.add_(0.02 * p.std() * torch.randn_like(p))  # as after fine-tuning
        with pytest.raises(SlimVLMError, match="trained with another model"):
            slimvlm.apply(model, f"llava-mini:weights={tmp_path}")
    finally:
        with torch.no_grad():
            for name, p in projector.named_parameters():
                p.copy_(original[name])


def test_load_refuses_weights_made_for_something_else(fresh, tmp_path):
    model, _ = fresh
    method = LlavaMini(budget=4, layers=1)
    method.build(model)
    method.save(tmp_path)
    with pytest.raises(SlimVLMError, match="budget"):
        LlavaMini(budget=16, weights=str(tmp_path))
    with pytest.raises(SlimVLMError, match="layers"):
        LlavaMini(layers=2, weights=str(tmp_path))
    other = LlavaMini(budget=16, layers=1)
    other.build(model)
    with pytest.raises(SlimVLMError, match="budget=4"):
        other.load(tmp_path)
    import json

    identity = json.loads((tmp_path / "llava_mini.json").read_text())
    identity["hidden_size"] += 4
    (tmp_path / "llava_mini.json").write_text(json.dumps(identity))
    with pytest.raises(SlimVLMError, match="hidden_size"):
        method.load(tmp_path)
    with pytest.raises(SlimVLMError, match="no LLaVA-Mini weights"):
        LlavaMini(weights=str(tmp_path / "missing"))


@pytest.mark.parametrize("spec", ["llava-mini:budget=0", "llava-mini:budget=-3", "llava-mini:layers=-1", "llava-mini:budget=2.5"])
def test_bad_options_are_refused(spec):
    with pytest.raises(SlimVLMError):
        slimvlm.registry.build(spec)


def test_budget_over_the_tokens_of_an_image_is_refused(fresh):
    model, _ = fresh
    with pytest.raises(SlimVLMError, match="larger than"):
        slimvlm.apply(model, "llava-mini:budget=577,layers=0")
