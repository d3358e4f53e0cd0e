"""AnyRes layout and packing: untouched views give exactly the model's own packed features; merged and
cut tokens land where the layout says."""

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from conftest import next_batch
from slimvlm.models import adapter_for
from slimvlm.models.anyres import ImageLayout, pack
from slimvlm.tokens import VisualTokens


@pytest.mark.parametrize("size", [(100, 230), (230, 100), (200, 190), (112, 112), (50, 400), (224, 224)], ids=str)
def test_layout_gives_the_processors_placeholders_and_the_models_crops(tiny_next, size):
    model, processor = tiny_next
    adapter = adapter_for(model)
    inputs = next_batch(processor, sizes=[size])
    layout = adapter.layout_of(*size)
    assert layout.slots == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert layout.views == image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 112)


def test_untouched_views_pack_into_the_models_own_image_features(tiny_next):
    model, processor = tiny_next
    inputs = next_batch(processor)
    adapter = adapter_for(model)
    with torch.no_grad():
        crops = adapter.views(inputs["pixel_values"], inputs["image_sizes"], False)
        tokens, _ = adapter.encode(crops, None)
        packed = adapter.pack(adapter.project(tokens))
        reference = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert packed.known == [len(image) for image in reference] == [166, 336]
    for mine, theirs in zip(packed.split(), reference):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # every slot holds one token of its own, in order: origins are the slots, sizes 1, past an image's slots -1
    for image, count in enumerate(packed.known):
        assert packed.origin[image, :count].tolist() == list(range(count))
        assert packed.patch_to_token[image].tolist() == list(range(count)) + [-1] * (336 - count)
        assert packed.size[image, :count].eq(1).all()


def test_merged_and_cut_tokens_land_on_their_first_kept_slot():
    # 2 x 2 patches per view; tiles 1 x 2 make a 2 x 4 canvas of which row 1 is kept: slots 0-3 base,
    # 4-7 the kept row, 8 its newline
    layout = ImageLayout(side=2, tiles=(1, 2), top=1, left=0, rows=1, cols=4)
    assert layout.slots == 9
    assert layout.view_slots().tolist() == [[0, 1, 2, 3], [-1, -1, 4, 5], [-1, -1, 6, 7]]
    x = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    views = VisualTokens.from_patches(x, (2, 2), has_cls=True)
    # in tile 0, patch 0 (cut) merges with patch 3 (kept): tokens 1 and 4 of view 1
    assign = torch.arange(5).expand(3, 5).clone()
    assign[1, 1] = 4
    views = views.regroup(assign, 5).drop_cls()
    newline = torch.tensor([-1.0, -2.0])
    packed = pack(views, [layout], newline)
    assert packed.known == [9]
    assert packed.origin[0].tolist() == list(range(9))
    assert packed.size[0].tolist() == [1.0] * 9  # the merged token keeps one slot: its other patch is cut
    expected = torch.stack([x[0, 1], x[0, 2], x[0, 3], x[0, 4],  # the base view
                            x[1, 3], (x[1, 1] + x[1, 4]) / 2,  # tile 0: patch 2, then the merged token; patch 1 went
                            x[2, 3], x[2, 4], newline])
    torch.testing.assert_close(packed.x[0], expected)
    assert packed.patch_to_token[0].tolist() == list(range(9))
    # a set chosen per view moves to the image's slots
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 3] = mask[1, 0] = True  # patch 0 of tile 0 was cut
    assert packed.patches_from_views(mask)[0].nonzero().flatten().tolist() == [5]


def test_class_tokens_come_first_in_view_order():
    layout = ImageLayout(side=2, tiles=(1, 2), top=0, left=0, rows=2, cols=4)
    x = torch.randn(3, 5, 2)
    packed = pack(VisualTokens.from_patches(x, (2, 2), has_cls=True), [layout], torch.zeros(2))
    assert packed.known == [3 + 4 + 2 * 5]
    torch.testing.assert_close(packed.x[0, :3], x[:, 0])
    assert packed.origin[0, :4].tolist() == [-1, -1, -1, 0]
