"""VisualTokens bookkeeping: regroup (merge/drop) on hand-checked examples."""

import torch

from slimvlm.tokens import CLS_ORIGIN, VisualTokens


def make(values, has_cls=True, grid=(2, 2)):
    x = torch.tensor(values, dtype=torch.float32)[None, :, None]
    return VisualTokens.from_patches(x, grid, has_cls)


def test_from_patches():
    tokens = make([9, 1, 2, 3, 4])
    assert tokens.origin.tolist() == [[CLS_ORIGIN, 0, 1, 2, 3]]
    assert tokens.patch_to_token.tolist() == [[1, 2, 3, 4]]
    assert tokens.counts.tolist() == [5]


def test_regroup_merges_by_size_weighted_mean_and_tracks_sources():
    tokens = make([9, 1, 2, 3, 4])
    merged = tokens.regroup(torch.tensor([[0, 1, 3, 3, 4]]), 5)  # patch 1 joins patch 2's token
    assert merged.x[0, :, 0].tolist() == [9, 1, 2.5, 4]
    assert merged.size.tolist() == [[1, 1, 2, 1]]
    assert merged.origin.tolist() == [[CLS_ORIGIN, 0, 1, 3]]
    assert merged.patch_to_token.tolist() == [[1, 2, 2, 3]]
    # merging again weighs by size: (2.5 * 2 + 4 * 1) / 3 = 3
    again = merged.regroup(torch.tensor([[0, 1, 2, 2]]), 4)
    assert again.x[0, :, 0].tolist() == [9, 1, 3]
    assert again.size.tolist() == [[1, 1, 3]]
    assert again.patch_to_token.tolist() == [[1, 2, 2, 2]]


def test_drop_and_padding_for_uneven_counts():
    x = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    tokens = VisualTokens.from_patches(x, (2, 2), True)
    kept = tokens.keep(torch.tensor([[True, True, False, False, True], [True, False, True, True, True]]))
    assert kept.counts.tolist() == [3, 4]
    assert kept.x[0, :3, 0].tolist() == [0, 1, 4] and kept.size[0, 3] == 0  # padding at the end
    assert kept.patch_to_token.tolist() == [[1, -1, -1, 2], [-1, 1, 2, 3]]
    bias = kept.attention_bias(proportional=False)
    assert bias[0, 0, 0].tolist() == [0, 0, 0, float("-inf")]
    assert tokens.min_count() == 5 and kept.known == [3, 4]  # read once, with the width
    told = tokens.keep(torch.tensor([[True, True, False, False, True], [True, False, True, True, True]]), counts=[3, 4])
    assert told.known == [3, 4] and torch.equal(told.x, kept.x)  # the caller knew: nothing read back
    assert kept.split()[0].shape == (3, 1)


def test_proportional_attention_bias_is_log_size():
    merged = make([9, 1, 2, 3, 4]).regroup(torch.tensor([[0, 1, 3, 3, 4]]), 5)
    bias = merged.attention_bias(proportional=True)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1, 1, 2.0, 1]).log())
    fresh = make([9, 1, 2, 3, 4])
    assert fresh.uniform and fresh.attention_bias(proportional=True) is None
    assert fresh.attention_bias(proportional=False) is None
    # after a regroup the bias is built without asking the device whether it is all zeros
    unchanged = fresh.regroup(torch.arange(5)[None], 5)
    assert not unchanged.uniform
    assert unchanged.attention_bias(proportional=True)[0, 0, 0].tolist() == [0] * 5
    # without proportional attention only padding is masked: none where every image fills the width (host-known)
    assert unchanged.known == [5] and unchanged.attention_bias(proportional=False) is None
    assert merged.known == [4] and merged.attention_bias(proportional=False) is None


def test_drop_cls():
    tokens = make([9, 1, 2, 3, 4]).drop_cls()
    assert not tokens.has_cls and tokens.x[0, :, 0].tolist() == [1, 2, 3, 4]
    assert tokens.patch_to_token.tolist() == [[0, 1, 2, 3]]
    # fresh patches take a slice; it is what dropping by regroup gives
    fresh = make([9, 1, 2, 3, 4])
    by_regroup = fresh.keep(~fresh.is_cls)
    for field in ("x", "size", "origin", "patch_to_token"):
        assert torch.equal(getattr(tokens, field), getattr(by_regroup, field))
    assert tokens.known == by_regroup.known == [4]


def test_layer_features_follow_every_regroup_with_the_weights_of_x():
    """Per-token features for the LLM's first layers (Qwen3-VL's DeepStack) merge and drop as x does."""
    x = torch.tensor([[[1.0], [3.0], [4.0], [5.0]]])
    features = torch.tensor([[10.0, 100.0], [30.0, 300.0], [40.0, 400.0], [50.0, 500.0]])[:, :, None]  # (4, K=2, 1)
    tokens = VisualTokens.from_images(list(x), [features])
    merged = tokens.regroup(torch.tensor([[0, 0, -1, 3]]), 4)  # 0 and 1 merge, 2 is dropped, 3 stays
    again = merged.regroup(torch.tensor([[0, 0]]), 2)  # by size: (2 * 2 + 5) / 3
    assert merged.x[0, :, 0].tolist() == [2, 5] and merged.layer_features[0, :, :, 0].tolist() == [[20, 200], [50, 500]]
    assert again.x[0, :, 0].tolist() == [3] and again.layer_features[0, :, :, 0].tolist() == [[30, 300]]
    both = VisualTokens.cat([merged, again])
    assert both.layer_features[:, :, 0, 0].tolist() == [[20, 50], [30, 0]]  # padded as x is


def test_a_rebuild_can_put_each_token_at_its_origins_placeholder():
    """An item whose placeholders come in two runs (Qwen3-VL's video frames): packed, its kept tokens fill the first
    placeholders from the first run on; at_origin, each stays at its own, in its own run."""
    from slimvlm.sequence import rebuild

    placeholder = 9
    input_ids = torch.tensor([[5, placeholder, placeholder, 6, placeholder, placeholder, 7]])
    text = torch.arange(7.0)[None, :, None]
    tokens = VisualTokens.from_images([torch.tensor([[10.0], [11.0], [12.0], [13.0]])]).keep(
        torch.tensor([[False, True, False, True]]))
    packed, kept = (rebuild(input_ids, text, None, None, None, tokens, (placeholder,), [4], keep_positions=True,
                            at_origin=at_origin) for at_origin in (False, True))
    assert packed.embeds[0, :, 0].tolist() == [0, 11, 13, 3, 6]
    assert kept.embeds[0, :, 0].tolist() == [0, 11, 3, 13, 6]
    assert kept.sequence.positions.tolist() == [[0, 2, 3, 5, 6]] and kept.sequence.token.tolist() == [[-1, 0, -1, 1, -1]]
