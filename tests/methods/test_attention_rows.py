"""Attention rows computed beside SDPA equal the rows of eager attention on the same inputs."""

import torch
from transformers import LlavaForConditionalGeneration

import slimvlm
from conftest import batch


class RecordRows(slimvlm.Method):
    """Keeps everything; records the rows it is given (stage 3: the text queries of layer 1)."""

    name = "test-rows"
    stages = frozenset({slimvlm.Stage.PREFILL, slimvlm.Stage.ENCODE})
    queries = "text"
    drop_layers = (2,)  # rows of layer 1

    def __init__(self):
        self.seen = {}

    def encode_layer(self, attention, tokens):
        cls = torch.zeros(tokens.batch_size, 1, dtype=torch.long)
        self.seen[f"vision{attention.layer}"] = attention.rows(cls)
        return tokens

    def prefill_keep(self, layer):
        self.seen["llm"] = (layer.rows, layer.query_index, layer.query_valid, layer.sequence)
        return torch.ones_like(layer.sequence.valid)


def test_rows_equal_eager_attention(tiny_dir, tiny):
    _, processor = tiny
    inputs = batch(processor, 2)
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
        vision = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    sdpa = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    method = RecordRows()
    with torch.no_grad(), slimvlm.apply(sdpa, method):
        sdpa(**inputs)

    rows, index, valid, sequence = method.seen["llm"]
    expected = out.attentions[1]  # (B, H, L, L): same sequence, since nothing was dropped before layer 2
    assert sequence.valid.shape == inputs["attention_mask"].shape
    for b in range(2):
        for q in range(index.shape[1]):
            if valid[b, q]:
                torch.testing.assert_close(rows[b, :, q], expected[b, :, index[b, q]], atol=1e-5, rtol=1e-4)
    assert int(valid.sum()) == int((inputs["attention_mask"].bool() & (inputs["input_ids"] != sdpa.config.image_token_id)).sum())
    for layer in range(2):
        torch.testing.assert_close(method.seen[f"vision{layer}"][:, :, 0], vision.attentions[layer][:, :, 0], atol=1e-5, rtol=1e-4)


def test_prefill_methods_keep_sdpa_on(tiny):
    model, processor = tiny
    with slimvlm.apply(model, "fastv"):
        assert model.config.text_config._attn_implementation == "sdpa"
        with torch.no_grad():
            model(**batch(processor, 1))
        assert model.config.text_config._attn_implementation == "sdpa"


def test_next_layer_rows_equal_eager_attention_of_the_layer_after_the_features(tiny_dir, tiny):
    """The tiny tower has 3 layers and LLaVA reads the output of layer 2; next_rows gives layer 3's CLS row."""
    _, processor = tiny
    inputs = batch(processor, 2)
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        vision = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)

    class ReadNext(slimvlm.Method):
        name = "test-next-rows"
        stages = frozenset({slimvlm.Stage.ENCODE})

        def encode_output(self, attention, tokens):
            self.rows = attention.next_rows(torch.zeros(tokens.batch_size, 1, dtype=torch.long))
            return tokens

    method = ReadNext()
    with torch.no_grad(), slimvlm.apply(eager, method):
        eager(**inputs)
    torch.testing.assert_close(method.rows[:, :, 0], vision.attentions[2][:, :, 0], atol=1e-5, rtol=1e-4)


def test_query_rows_after_the_image():
    from slimvlm.sequence import Sequence
    from slimvlm.method import query_index

    visual = torch.tensor([[False, False, True, True, False, False], [False, True, True, False, False, False]])
    valid = torch.tensor([[True] * 6, [False] + [True] * 5])
    sequence = Sequence(valid, torch.zeros(2, 6, dtype=torch.long), visual, visual.long() - 1, visual.long() - 1)
    index, ok = query_index(sequence, "text_after_image")
    assert index[ok].tolist() == [4, 5, 3, 4, 5]
    index, ok = query_index(sequence, "text")
    assert index[0][ok[0]].tolist() == [0, 1, 4, 5] and index[1][ok[1]].tolist() == [0, 3, 4, 5][1:]


class DropTwice(slimvlm.Method):
    """Drops visual tokens at two layers (odd tokens, then every other even one); records the query rows each
    drop is given and what query_index finds on that layer's sequence."""

    name = "test-drop-twice"
    stages = frozenset({slimvlm.Stage.PREFILL})
    queries = "text_after_image"
    drop_layers = (1, 2)

    def __init__(self):
        self.seen = []

    def prefill_keep(self, layer):
        from slimvlm.method import query_index

        self.seen.append((layer.query_index, layer.query_valid, *query_index(layer.sequence, self.queries)))
        step = 2 * len(self.seen)
        return ~layer.sequence.visual | (layer.sequence.token % step == 0)


def test_query_rows_carried_through_drops_are_those_of_each_sequence(fresh):
    """Later probes reuse the question found at the first one, moved through each drop: no read, same rows."""
    from slimvlm.device_reads import HostReads

    model, processor = fresh
    method = DropTwice()
    with torch.no_grad(), slimvlm.apply(model, method), HostReads() as reads:
        model(**batch(processor, 2))
    assert len(method.seen) == 2
    for carried, carried_valid, found, found_valid in method.seen:
        assert torch.equal(carried_valid, found_valid)
        assert torch.equal(carried[carried_valid], found[found_valid])
    compactions = sum(count for place, count in reads.where.items() if "sequence.py" in place)
    assert compactions == 1 + 1 + 2 + 2  # the rebuild, the question once, each drop; and this test's query_index twice
