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
