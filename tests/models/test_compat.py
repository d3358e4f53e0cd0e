"""The transformers-release shims name what the installed release binds."""

import inspect

import torch
from transformers import DynamicCache, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention

import slimvlm
from conftest import batch
from slimvlm.models.compat import cache_kwarg


def test_cache_kwarg_follows_the_signature():
    def renamed(hidden, cache=None, **kwargs): ...

    def older(hidden, past_key_values=None, **kwargs): ...

    assert cache_kwarg(renamed) == "cache"
    assert cache_kwarg(older) == "past_key_values"


def test_cache_kwarg_is_a_parameter_of_the_installed_release():
    for forward in (LlamaModel.forward, LlamaAttention.forward):
        assert cache_kwarg(forward) in inspect.signature(forward).parameters


def test_a_hand_written_decode_loop_may_pass_the_cache_as_past_key_values(fresh):
    """The older keyword still reaches slimvlm's decode path on releases that renamed it."""
    model, processor = fresh
    inputs = batch(processor, 1, seed=3)
    with torch.no_grad(), slimvlm.apply(model, "tome:r=8"):
        reference = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
        cache = DynamicCache(config=model.config.text_config)
        prefill = model(**inputs, past_key_values=cache, use_cache=True)
        first = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first)], dim=1)
        step = model(input_ids=first, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert torch.equal(first[0, 0], reference.sequences[0, inputs["input_ids"].shape[1]])
    assert torch.allclose(step.logits[0, -1], reference.scores[1][0], atol=1e-4)
