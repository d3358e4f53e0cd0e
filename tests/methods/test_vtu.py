"""Virtual token unmerging: the defining identity, the no-merge case, batches and generate."""

import pytest
import torch

import slimvlm
from slimvlm.attention import apply_rope
from slimvlm.runtime.unmerge import Copies, virtual_unmerge_attention
from conftest import batch, select


def rotary(model, positions):
    lm = model.model.language_model
    return lm.rotary_emb(torch.zeros(1), position_ids=positions)


def test_vtu_layer_equals_remerged_layer_on_the_unmerged_sequence(tiny):
    model, _ = tiny
    attn = model.model.language_model.layers[1].self_attn
    torch.manual_seed(0)
    # merged: text@0, a token covering positions 1-3, one at 4, one covering 5-6, text@7
    source = torch.tensor([[0, 1, 1, 1, 2, 3, 3, 4]])
    merged_positions = torch.tensor([[0, 1, 4, 5, 7]])
    full_positions = torch.arange(8)[None]
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)

    def project(x, positions):
        shape = (1, x.shape[1], -1, attn.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = rotary(model, positions)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    with torch.no_grad():
        # the ordinary attention layer on the explicitly unmerged sequence, then the mean over copies
        q, k, v = project(hidden[:, source[0]], full_positions)
        groups = q.shape[1] // k.shape[1]
        full = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True, scale=attn.scaling
        )
        full = attn.o_proj(full.transpose(1, 2).reshape(1, 8, -1))
        expected = torch.stack([full[0, source[0] == i].mean(0) for i in range(5)])[None]
        # VTU on the merged sequence
        q, k, v = project(hidden, merged_positions)
        rotation = full_positions - merged_positions[0, source[0]][None]
        copies = Copies(source, rotation, full_positions, torch.ones(1, 8, dtype=torch.bool))
        copies.cos, copies.sin = rotary(model, rotation)
        out = virtual_unmerge_attention(attn, q, k, v, copies, copies)
        out = attn.o_proj(out.reshape(1, 5, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vtu_without_merges_is_the_untouched_model(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        reference = model(**inputs).logits
        with slimvlm.apply(model, ["tome:r=0", "vtu"]) as handle:
            logits = model(**inputs).logits
            assert handle.stats.attention_tokens[0] == handle.stats.llm_tokens[0]
    valid = inputs["attention_mask"].bool()
    assert (logits - reference)[valid].abs().max().item() < 1e-4


def test_vtu_with_merges_generates_like_one_by_one(fresh):
    model, processor = fresh
    inputs = batch(processor, 2, seed=4)
    with torch.no_grad(), slimvlm.apply(model, ["tome:r=40", "vtu"]) as handle:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert handle.stats.visual_tokens == [496, 496]
        # attention runs over every patch again: the prompt's full length
        assert handle.stats.attention_tokens[0] == inputs["attention_mask"].sum(dim=1).tolist()
        for index in range(2):
            alone = model.generate(**select(inputs, index), max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)


def test_vtu_changes_the_merged_model(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    with torch.no_grad():
        with slimvlm.apply(model, "tome:r=40", keep_positions=True):
            merged = model(**inputs).logits[:, -1]
        with slimvlm.apply(model, ["tome:r=40", "vtu"]):
            unmerged = model(**inputs).logits[:, -1]
    assert not torch.allclose(merged, unmerged)


def test_vtu_refuses_a_cache_editing_method(fresh):
    model, _ = fresh
    with pytest.raises(slimvlm.SlimVLMError, match="virtual unmerging cannot be combined"):
        slimvlm.apply(model, ["vtu", "mustdrop:lsm=false,important=false,filter=false,output_cache=true,cache_keep=final"])


def test_a_token_without_patches_stays_one_token(fresh):
    """VisionZip passes the class token on; it covers no patch, so VTU keeps it as itself."""
    model, processor = fresh
    inputs = batch(processor, 1)
    with torch.no_grad(), slimvlm.apply(model, ["visionzip", "vtu"]) as handle:
        model(**inputs)
        # 53 dominant patches + 10 contextual tokens cover 576 patches; the class token adds one
        assert handle.stats.attention_tokens[0] == [inputs["attention_mask"].sum().item() + 1]
