"""Multi-turn chat on a cache slimvlm reduced: a follow-up turn continues its conversation, also after other prompts
were served in between; a cache this handle did not fill is refused."""

import pytest
import torch
from conftest import batch

import slimvlm
from slimvlm.models.compat import cache_kwarg

FOLLOW_UP = torch.tensor([[9, 10, 11], [12, 13, 14]])  # the user's next turn, a few text tokens per sample


def greedy(model, **kwargs):
    return model.generate(**kwargs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)


def turns(model, inputs):
    """(turn one, the whole conversation's ids and mask for turn two, the cache turn one filled); a conversation
    with other images is served between the two turns."""
    first = greedy(model, **inputs)
    greedy(model, **batch(model._processor, 2, seed=1))
    ids = torch.cat([first.sequences, FOLLOW_UP], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                             dtype=torch.long)], dim=1)
    return first, ids, mask, getattr(first, cache_kwarg(type(model).forward))


@pytest.fixture
def chat(fresh):
    model, processor = fresh
    model._processor = processor
    yield model, batch(processor, 2)
    del model._processor


@pytest.mark.parametrize("spec", ["none", "divprune:budget=16", "tome:r=8", "visionzip", "pool:budget=16",
                                  ["tome:r=8", "vtu"]])
def test_a_follow_up_turn_equals_a_fresh_run_of_the_whole_conversation(chat, spec):
    """Stages 1-2 (and virtual unmerging): the image was reduced as a fresh run reduces it, so continuing the cache
    gives what running the whole conversation again gives."""
    model, inputs = chat
    name = cache_kwarg(type(model).forward)
    with torch.no_grad(), slimvlm.apply(model, spec):
        _, ids, mask, cache = turns(model, inputs)
        continued = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], **{name: cache})
        fresh = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"])
    assert torch.equal(continued.sequences, fresh.sequences)
    for a, b in zip(continued.scores, fresh.scores):
        assert torch.allclose(a, b, atol=1e-4), spec


@pytest.mark.parametrize("spec", ["fastv:k=2,ratio=0.5", "mustdrop-llava7b-64"])
def test_after_stage_3_4_drops_a_follow_up_attends_to_what_was_kept(chat, spec):
    """The first turn's drops stand: the follow-up's tokens enter every layer's kept entries, in one step as token
    by token (a fresh run would drop again, for its own last token)."""
    model, inputs = chat
    name = cache_kwarg(type(model).forward)
    with torch.no_grad(), slimvlm.apply(model, spec):
        first, ids, mask, cache = turns(model, inputs)
        held = [layer.keys.shape[2] for layer in cache.layers]
        at_once = model(input_ids=ids[:, -4:], attention_mask=mask, **{name: cache}).logits[:, -1]
        assert [layer.keys.shape[2] for layer in cache.layers] == [h + 4 for h in held]  # kept + the new turn
        _, _, _, again = turns(model, inputs)
        for step in range(4):
            width = mask.shape[1] - 3 + step
            one = model(input_ids=ids[:, width - 1 : width], attention_mask=mask[:, :width], **{name: again}).logits[:, -1]
    assert torch.allclose(at_once, one, atol=1e-4)


def test_a_cache_this_handle_did_not_fill_is_refused(chat):
    model, inputs = chat
    name = cache_kwarg(type(model).forward)
    with torch.no_grad():
        _, ids, mask, untouched_cache = turns(model, inputs)  # a run without slimvlm
        with slimvlm.apply(model, "divprune:budget=16"):
            with pytest.raises(slimvlm.SlimVLMError, match="not started under this slimvlm handle"):
                greedy(model, input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], **{name: untouched_cache})
            _, ids, mask, cache = turns(model, inputs)
        with slimvlm.apply(model, "divprune:budget=16"):  # another handle
            with pytest.raises(slimvlm.SlimVLMError, match="not started under this slimvlm handle"):
                greedy(model, input_ids=ids, attention_mask=mask, **{name: cache})


def test_a_follow_up_must_continue_the_conversation_and_bring_no_image(chat):
    model, inputs = chat
    name = cache_kwarg(type(model).forward)
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=16"):
        first, ids, mask, cache = turns(model, inputs)
        other = ids.clone()
        other[:, -5] += 1  # a token turn one did not generate
        with pytest.raises(slimvlm.SlimVLMError, match="do not continue the conversation"):
            greedy(model, input_ids=other, attention_mask=mask, **{name: cache})
        image = model.config.image_token_id
        with_image = torch.cat([first.sequences, torch.full((2, 3), image)], dim=1)
        with pytest.raises(slimvlm.SlimVLMError, match="a follow-up turn brings an image"):
            greedy(model, input_ids=with_image, attention_mask=torch.ones_like(with_image), **{name: cache})


def test_text_only_prompts_continue_untouched(chat):
    model, _ = chat
    name = cache_kwarg(type(model).forward)
    text = {"input_ids": torch.tensor([[2, 7, 8, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        reference = greedy(model, **text)
        with slimvlm.apply(model, "divprune:budget=16"):
            first = greedy(model, **text)
            ids = torch.cat([first.sequences, FOLLOW_UP[:1]], dim=1)
            continued = greedy(model, input_ids=ids, attention_mask=torch.ones_like(ids), **{name: getattr(first, name)})
    assert torch.equal(first.sequences, reference.sequences)
    assert continued.sequences.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("spec", ["divprune:budget=16", "fastv:k=2,ratio=0.5"])
def test_a_follow_up_on_the_static_cache_is_refused(chat, spec):
    model, inputs = chat
    name = cache_kwarg(type(model).forward)
    with torch.no_grad(), slimvlm.apply(model, spec):
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               cache_implementation="static")
        ids = torch.cat([first.sequences, FOLLOW_UP], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 6, dtype=torch.long)], dim=1)
        with pytest.raises(slimvlm.SlimVLMError, match="follow-up turn on slimvlm's static cache"):
            greedy(model, input_ids=ids, attention_mask=mask, **{name: getattr(first, name)})
