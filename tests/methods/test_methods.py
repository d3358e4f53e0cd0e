"""Each method against a small hand-checked example of its paper's algorithm."""

import pytest
import torch
import torch.nn.functional as F

from slimvlm.errors import SlimVLMError
from slimvlm.methods.divprune import max_min_diverse
from slimvlm.methods.fastv import FastV, lowest_attention_drop
from slimvlm.methods.tome import ToMe, bipartite_matching, merge_count
from slimvlm.methods.visionzip import VisionZip, contextual_groups
from slimvlm.methods.baselines import Pool, UniformKeep, uniform_indices
from slimvlm.sequence import Sequence
from slimvlm.method import EncoderAttention, PrefillLayer, PromptContext
from slimvlm.tokens import VisualTokens


def test_tome_bipartite_matching_hand_example():
    # tokens: CLS, a0..: A = even indices [0, 2, 4], B = odd [1, 3, 5]
    metric = torch.tensor([[[1.0, 0], [0, 1], [0.6, 0.8], [1, 0], [0.9, 0.1], [-1, 0]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    protect = torch.tensor([[True, False, False, False, False, False]])
    # cos(A2=(.6,.8), B1=(0,1)) = .8; cos(A4 ~ (.99,.11), B3=(1,0)) = .994 -> the best edge
    assign = bipartite_matching(metric, valid, protect, r=1)
    assert assign.tolist() == [[0, 1, 2, 3, 3, 5]]
    assign = bipartite_matching(metric, valid, protect, r=2)
    assert assign.tolist() == [[0, 1, 1, 3, 3, 5]]  # CLS (index 0) never merges even though it matches B3 best
    assert merge_count(8, 6, 1) == 2 and merge_count(8, 577, 1) == 8


def test_tome_layer_merges_r_and_sizes_add_up():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 8)
    tokens = VisualTokens.from_patches(x, (4, 4), True)
    keys = torch.randn(2, 2, 17, 4)
    attention = EncoderAttention(layer=0, num_layers=1, keys=keys, rows=None)
    merged = ToMe(r=5).encode_layer(attention, tokens)
    assert merged.counts.tolist() == [12, 12]
    assert merged.size.sum(dim=1).tolist() == [17, 17]
    assert merged.is_cls[:, 0].all()
    # the size-weighted mean preserves the sum of features
    torch.testing.assert_close((merged.x * merged.size[..., None]).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)


def test_fastv_drops_the_least_attended_visual_tokens():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.2, 0.9]])
    visual = torch.tensor([[False, True, True, True, True, False]])
    keep = lowest_attention_drop(scores, visual, ratio=0.5)
    assert keep.tolist() == [[True, False, True, False, True, True]]  # 0.05 and 0.1 go, text stays
    method = FastV(k=2, ratio=0.5)
    assert method.drop_layers == (2,)  # scored on the attention of layer 1
    rows = torch.zeros(1, 2, 1, 6)
    rows[0, 0, 0] = scores[0] * 2
    sequence = Sequence(valid=torch.ones(1, 6, dtype=torch.bool), positions=torch.arange(6)[None], visual=visual, image=visual.long() - 1, token=visual.long().cumsum(1) - 1)
    layer = PrefillLayer(2, sequence, torch.zeros(1, 6, 4), rows, torch.tensor([[5]]), torch.tensor([[True]]))
    assert method.prefill_keep(layer).tolist() == keep.tolist()  # the mean over heads ranks the same


def test_fastv_drops_per_row_rounding_half_to_even_without_reading_the_device():
    """Rows of 5 and 3 visual tokens at ratio 0.5: round(2.5) = 2 and round(1.5) = 2 go, the lowest of each row."""
    from slimvlm.device_reads import HostReads

    scores = torch.tensor([[0.9, 0.4, 0.1, 0.3, 0.2, 0.5, 0.0], [0.9, 0.3, 0.1, 0.2, 0.8, 0.7, 0.6]])
    visual = torch.tensor([[False, True, True, True, True, True, False], [False, True, True, True, False, False, False]])
    with HostReads() as reads:
        keep = lowest_attention_drop(scores, visual, ratio=0.5)
    assert reads.total == 0
    assert keep.tolist() == [[True, True, False, True, False, True, True], [True, True, False, False, True, True, True]]


def diverse_indices(features: torch.Tensor, keep: int) -> list[int]:
    """max_min_diverse on one image, as the indices kept."""
    valid = torch.ones(1, features.shape[0], dtype=torch.bool)
    return max_min_diverse(features[None], valid, [keep], [features.shape[0]])[0].nonzero().flatten().tolist()


def test_divprune_greedy_max_min_hand_example():
    # unit vectors at angles 0, 10, 90, 180, 95 degrees
    angles = torch.tensor([0.0, 10, 90, 180, 95]) * torch.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    # first: farthest nearest neighbour -> 180 deg (nearest is 95 deg, distance 1 - cos 85)
    # then: farthest from {180} -> 0 deg; then: max of min distance -> 90 deg (vs 95 deg: 95 is closer to 180)
    assert diverse_indices(features, 1) == [3]
    assert diverse_indices(features, 2) == [0, 3]
    assert diverse_indices(features, 3) == [0, 2, 3]
    assert diverse_indices(features, 9) == [0, 1, 2, 3, 4]


def authors_divprune(features: torch.Tensor, keep: int) -> list[int]:
    """The authors' greedy loop as published (DivPrune, CVPR'25), for distinct tokens: the first pick has the
    farthest nearest neighbour (second-smallest of its column), each next the largest min-distance to the picks."""
    normed = F.normalize(features, dim=-1)
    distance = 1.0 - normed @ normed.T
    picks: list[int] = []
    for _ in range(keep):
        if not picks:
            scores = distance.topk(2, dim=0, largest=False).values[1]
        else:
            scores = distance[picks].min(dim=0).values
        picks.append(int(scores.argmax()))
    return sorted(picks)


def test_divprune_chooses_what_the_authors_loop_chooses():
    generator = torch.Generator().manual_seed(1)
    for n, keep in ((40, 1), (40, 7), (200, 56), (300, 150)):
        features = torch.randn(n, 16, generator=generator)
        assert diverse_indices(features, keep) == authors_divprune(features, keep)


def test_divprune_without_the_whole_distance_matrix_chooses_the_same(monkeypatch):
    """Past MATRIX_BYTES (a long video) each pick's row is computed and the nearest neighbours found in blocks."""
    from slimvlm.methods import divprune

    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 50, 8, generator=generator)
    counts, keeps = [50, 31, 9], [20, 12, 3]
    valid = torch.arange(50)[None] < torch.tensor(counts)[:, None]
    features[~valid] = 1e3
    whole = max_min_diverse(features, valid, keeps, counts)
    monkeypatch.setattr(divprune, "MATRIX_BYTES", 0)
    monkeypatch.setattr(divprune, "BLOCK_BYTES", 4 * 3 * 50 * 7)  # blocks of 7 rows: the last one short
    assert torch.equal(max_min_diverse(features, valid, keeps, counts), whole)
    for n, keep in ((40, 7), (300, 150)):
        alone = torch.randn(n, 16, generator=generator)
        assert diverse_indices(alone, keep) == authors_divprune(alone, keep)
    assert diverse_indices(torch.cat([torch.ones(6, 2), torch.tensor([[1.0, -1.0]])]), 4) == [0, 1, 2, 6]


def test_divprune_meets_its_budget_on_identical_tokens():
    features = torch.cat([torch.ones(6, 2), torch.tensor([[1.0, -1.0]])])  # a flat background + one object
    assert diverse_indices(features, 4) == [0, 1, 2, 6]


def test_divprune_batch_with_padding_chooses_what_each_image_chooses_alone():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 12, 8, generator=generator)
    counts, keeps = [12, 7, 1], [5, 3, 1]
    valid = torch.arange(12)[None] < torch.tensor(counts)[:, None]
    features[~valid] = 1e3  # padding must never be chosen nor change a distance
    mask = max_min_diverse(features, valid, keeps, counts)
    for image, (count, keep) in enumerate(zip(counts, keeps)):
        alone = diverse_indices(features[image, :count], keep)
        assert len(alone) == keep
        assert mask[image].nonzero().flatten().tolist() == alone


def test_divprune_dispatches_three_ops_per_pick_at_batch_1_and_four_past_it():
    """At batch 1 on a GPU the greedy loop is paid in launches, one per op (640 picks of a video)."""
    from slimvlm.device_reads import HostReads

    def ops(batch: int, keep: int) -> int:
        features = torch.randn(batch, 300, 8, generator=torch.Generator().manual_seed(0))
        valid = torch.ones(batch, 300, dtype=torch.bool)
        with HostReads() as reads:
            max_min_diverse(features, valid, [keep] * batch, [300] * batch)
        assert reads.total == 0
        return reads.ops

    assert ops(1, 150) - ops(1, 50) == 3 * 100
    assert ops(2, 150) - ops(2, 50) == 4 * 100


def test_visionzip_hand_example():
    # 1 CLS + 6 patches on a 2x3 grid; CLS attends most to patches 4 and 1
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1) * 10
    tokens = VisualTokens.from_patches(x, (2, 3), True)
    cls_row = torch.tensor([0.0, 0.1, 0.02, 0.03, 0.5, 0.05, 0.3])  # token indices 0..6

    def rows(query_index):
        assert query_index.tolist() == [[0]]
        return cls_row.view(1, 1, 1, 7)

    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0]]).view(1, 1, 7, 2)
    out = VisionZip(dominant=3, contextual=2).encode_output(EncoderAttention(0, 1, keys, rows), tokens)
    # dominant: CLS + tokens 4 and 6; remaining (spatial order): tokens 1, 2, 3, 5; targets at stride 2: tokens 1 and 3
    # token 2 (key (1,0)) joins target 3 (key (.9,.1)); token 5 (key (.1,.9)) joins target 1 (key (0,1))
    assert out.x[0, :, 0].tolist() == [0, 40, 60, 10 + 50, 30 + 20]
    assert out.size.tolist() == [[1, 1, 1, 2, 2]]
    assert out.origin.tolist() == [[-1, 3, 5, 0, 1]]
    targets, group = contextual_groups(keys[:, 0, [1, 2, 3, 5]], 2)
    assert targets.tolist() == [0, 2] and group.tolist() == [[0, 1, 1, 0]]


def test_uniform_and_pool():
    assert uniform_indices(24, 8).tolist() == [1, 4, 7, 10, 13, 16, 19, 22]
    x = torch.randn(1, 576, 3)
    tokens = VisualTokens.from_patches(x, (24, 24), False)
    kept = UniformKeep(budget=64).project(tokens, PromptContext(None, []))
    assert kept.counts.tolist() == [64]
    assert kept.origin[0, :3].tolist() == [24 + 1, 24 + 4, 24 + 7]
    pooled = Pool(budget=64).project(tokens, PromptContext(None, []))
    expected = F.avg_pool2d(x[0].T.reshape(3, 24, 24), 3).reshape(3, 64).T
    torch.testing.assert_close(pooled.x[0], expected)
    assert pooled.size.tolist() == [[9.0] * 64]


def test_divprune_lists_the_papers_ratio_as_its_default_and_a_budget_replaces_it():
    from slimvlm.registry import build, methods

    assert methods()["divprune"]["options"] == {"budget": None, "ratio": 0.098}
    assert (build("divprune").budget, build("divprune").ratio) == (None, 0.098)
    assert (build("divprune:budget=64").budget, build("divprune:budget=64").ratio) == (64, None)
    with pytest.raises(SlimVLMError, match="give exactly one of budget"):
        build("divprune:budget=64,ratio=0.098")
