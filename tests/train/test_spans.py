"""The direct training forward's pieces (slimvlm.train.spans): where a batch's image sits, splicing, shared images."""

import pytest
import torch

from slimvlm.errors import SlimVLMError
from slimvlm.train.spans import ImageSpan, row_tokens


def test_the_span_of_a_batch_on_a_hand_example():
    ids = torch.tensor([[2, 9, 9, 9, 5, 6, 0], [2, 9, 9, 9, 7, 0, 0]])
    span = ImageSpan.of(ids, image_token_id=9)
    assert span == ImageSpan(1, 3)
    rows = torch.arange(14).view(2, 7)
    assert span.splice(rows, torch.tensor([[-1], [-2]])).tolist() == [[0, -1, 4, 5, 6], [7, -2, 11, 12, 13]]
    assert span.text(rows).tolist() == [[0, 4, 5, 6], [7, 11, 12, 13]]
    labels = torch.tensor([[-100, -100, -100, -100, -100, 6, -100]] * 2)
    assert span.splice_labels(labels, 2).tolist() == [[-100, -100, -100, -100, 6, -100]] * 2


@pytest.mark.parametrize("ids", [
    [[2, 9, 9, 5], [9, 9, 2, 5]],  # the spans start at different columns
    [[2, 9, 9, 5], [2, 9, 5, 0]],  # of different lengths
    [[2, 9, 5, 9], [2, 9, 5, 9]],  # two runs in a row
    [[2, 5, 6, 0], [2, 5, 6, 0]],  # no image
])
def test_batches_without_one_span_at_one_place_are_refused(ids):
    with pytest.raises(SlimVLMError, match="one run of placeholders"):
        ImageSpan.of(torch.tensor(ids), image_token_id=9)


def test_rows_that_share_an_image_get_its_tokens(fresh):
    """image_index: the vision tower runs once per image, each row gets its image's tokens (pruned, where asked)."""
    from conftest import images

    import slimvlm

    model, processor = fresh
    pixels = processor.image_processor(images(2), return_tensors="pt")["pixel_values"]
    index = torch.tensor([1, 0, 1])
    pruner = slimvlm.registry.build("divprune:budget=7")
    with torch.no_grad():
        shared = row_tokens(model, {"pixel_values": pixels, "image_index": index}, pruner)
        per_row = row_tokens(model, {"pixel_values": pixels[index]}, pruner)
    assert shared.known == [7, 7, 7] and torch.allclose(shared.x, per_row.x)
