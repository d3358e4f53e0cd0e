"""ToMe and DyMU's DToMe form the groups the published code forms, over several layers (issue 17).

The reference below is written from the published algorithm (facebookresearch/ToMe merge.py:
bipartite_soft_matching + merge_wavg + merge_source; MikeWangWZHL/dymu src/open_clip/tome.py: the
same split with every edge above a threshold merged): after each merge the tokens stand as
cat([unmerged A tokens in order, B tokens]), and the next layer's alternating split runs over that.
"""

import torch

from slimvlm.methods.dymu import DyMU
from slimvlm.methods.tome import ToMe
from slimvlm.method import EncoderAttention
from slimvlm.tokens import VisualTokens


def reference_layer(x, size, source, metric, r=None, threshold=None):
    """One published merge of one image: x (N, C), size (N,), source (N, P) 0/1, metric (N, K)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[::2] @ metric[1::2].T
    scores[0, :] = -float("inf")  # the class token never merges
    best, partner = scores.max(dim=-1)
    order = best.argsort(descending=True, stable=True)
    count = r if threshold is None else int((best > threshold).sum())
    src, unm = order[:count], order[count:].sort().values

    def merge(t):  # mode "sum"
        a, b = t[::2], t[1::2]
        return torch.cat([a[unm], b.index_add(0, partner[src], a[src])])

    weighted = merge(x * size[:, None])
    size = merge(size)
    return weighted / size[:, None], size, merge(source)


def reference_run(x, projections, r=None, thresholds=None):
    """The published merges over layers; projections[l] (C, K) makes layer l's keys from x."""
    n = x.shape[0]
    size, source = torch.ones(n), torch.eye(n)
    for layer, projection in enumerate(projections):
        x, size, source = reference_layer(x, size, source, x @ projection, r=r,
                                          threshold=None if thresholds is None else thresholds[layer])
        x = torch.tanh(x)  # a stand-in for the MLP, the same on both sides
    return x, size, source


def ours_run(method, x, projections):
    tokens = VisualTokens.from_patches(x, (4, 4), True)
    for layer, projection in enumerate(projections):
        keys = (tokens.x @ projection)[:, None]  # (B, 1 head, N, K): the mean over heads is the metric
        tokens = method.encode_layer(EncoderAttention(layer, len(projections), keys, rows=None), tokens)
        tokens = tokens.with_features(torch.tanh(tokens.x))
    return tokens


def assert_same_groups(tokens, image: int, reference) -> None:
    x, size, source = reference
    count = tokens.host_counts()[image]
    assert count == x.shape[0]
    torch.testing.assert_close(tokens.x[image, :count], x, atol=1e-6, rtol=1e-6)
    assert tokens.size[image, :count].tolist() == size.tolist()
    # the patch -> token map of the reference's source matrix (token 0 is the class token)
    assert tokens.patch_to_token[image].tolist() == source[:, 1:].argmax(dim=0).tolist()


def test_tome_forms_the_published_groups_over_several_layers():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 6, generator=generator)
    projections = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    method = ToMe(r=3)
    tokens = ours_run(method, x, projections)
    for image in range(2):
        assert_same_groups(tokens, image, reference_run(x[image], projections, r=3))
    # the LLM gets them back in spatial order: the same groups, sorted by their first patch
    spatial = method.encode_output(None, tokens)
    assert spatial.origin[:, 1:].diff(dim=1).gt(0).all() and spatial.is_cls[:, 0].all()
    assert sorted(spatial.size[0].tolist()) == sorted(tokens.size[0].tolist())


class Thresholds:
    """What DyMU reads of a calibration: a threshold and a scheduled r per layer."""

    def __init__(self, taus):
        self.thresholds, self.schedule = taus, [1] * len(taus)


def test_dtome_forms_the_published_groups_per_image_in_a_padded_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 6, generator=generator)
    x[1, 1:] = x[1, 1:1 + 1] + 0.3 * x[1, 1:]  # the second image is far more uniform: it merges more
    projections = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    taus = [0.5, 0.6, 0.0]
    method = DyMU(thresholds=None, target=10)
    method.calibration, method.taus = Thresholds(taus), taus
    tokens = ours_run(method, x, projections)
    counts = tokens.host_counts()
    assert counts[0] != counts[1]  # different counts: the batch is padded
    for image in range(2):
        assert_same_groups(tokens, image, reference_run(x[image], projections, thresholds=taus))
