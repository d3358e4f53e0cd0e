"""Every input a user passes works or is refused clearly; nothing goes silently wrong (issue 15)."""

import copy
import warnings

import pytest
import torch

import slimvlm
from conftest import assert_visual_tokens, batch, select
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches
from slimvlm.methods.llava_mini import UntrainedModulesWarning
from slimvlm.registry import build


@pytest.mark.parametrize("spec, says", [
    ("tome:r=abc", "r=abc must be a whole number"),
    ("tome:r=2.5", "r=2.5 must be a whole number"),
    ("tome:r=true", "r=true must be a whole number"),
    ("divprune:budget=32.5", "budget=32.5 must be a whole number"),
    ("fastv:ratio=half", "ratio=half must be a number"),
    ("dymu:vtu=1", "vtu=1 must be true or false"),
])
def test_option_values_of_the_wrong_type_are_refused(spec, says):
    with pytest.raises(slimvlm.SlimVLMError, match=says):
        build(spec)


def test_options_from_python_are_checked_too():
    with pytest.raises(slimvlm.SlimVLMError, match="r=2.5 must be a whole number"):
        build("tome", r=2.5)
    with pytest.raises(slimvlm.SlimVLMError, match="r=True must be a whole number"):
        build("tome", r=True)
    assert build("fastv", ratio=1).ratio == 1.0  # a whole number is a number
    assert build("tome:r=8").r == 8 and build("divprune:ratio=0.1").ratio == 0.1


def test_an_old_handle_never_removes_a_new_one(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    old = slimvlm.apply(model, "divprune:budget=32")
    old.remove()
    new = slimvlm.apply(model, "divprune:budget=32")
    old.remove()  # already removed: does nothing
    with torch.no_grad():
        model(**inputs)
    assert new.stats.visual_tokens == [32]
    new.remove()
    new.remove()
    assert "forward" not in model.__dict__


def test_an_applied_model_is_not_deep_copied_or_pickled(tiny_dir):
    import pickle

    from slimvlm.testbed.build import load

    model, _ = load(tiny_dir)  # its own: the shared one may carry hooks other tests' transformers calls left
    # a deep copy would run the original's weights, and its remove() would undo the original's
    with slimvlm.apply(model, ["tome:r=8", "vtu"]):
        with pytest.raises(slimvlm.SlimVLMError, match="cannot be copied or pickled"):
            copy.deepcopy(model)
        with pytest.raises(slimvlm.SlimVLMError, match="cannot be copied or pickled.*handle.remove"):
            pickle.dumps(model)
    assert pickle.loads(pickle.dumps(model)) is not None  # removed: the model pickles as before


def test_an_applied_qwen_model_is_not_pickled(fresh_qwen):
    import pickle

    with slimvlm.apply(fresh_qwen, "divprune:budget=8"):  # Qwen's generate() patches are the first thing pickle meets
        with pytest.raises(slimvlm.SlimVLMError, match="cannot be copied or pickled"):
            pickle.dumps(fresh_qwen)


def test_pool_is_refused_on_a_model_that_keeps_the_class_token(tiny_dir):
    from slimvlm.testbed.build import load

    model, _ = load(tiny_dir)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(slimvlm.SlimVLMError, match="577 tokens per image"):
        slimvlm.apply(model, "pool:budget=64")


def test_random_keeps_what_each_image_keeps_alone(fresh):
    model, processor = fresh
    inputs = batch(processor, 3, seed=4)
    with torch.no_grad(), slimvlm.apply(model, "random:budget=30") as handle:
        model(**inputs)
        batched = handle.stats.sources
        for index in range(3):
            model(**select(inputs, index))
            assert handle.stats.sources == [batched[index]]


def test_untrained_llava_mini_warns(fresh):
    model, _ = fresh
    with pytest.warns(UntrainedModulesWarning, match="untrained"):
        slimvlm.apply(model, "llava-mini:budget=2").remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimvlm.apply(model, "divprune:budget=2").remove()


def text_labels(inputs: dict, image_token_id: int) -> torch.Tensor:
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


@pytest.mark.parametrize("spec", ["fastv", "mustdrop-llava7b-64", "divprune:budget=32", ["tome:r=8", "fastv:k=1,ratio=0.75"]], ids=str)
def test_labels_follow_the_sequence_whatever_stage_shortens_it(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 2)
    labels = text_labels(inputs, model.config.image_token_id)
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        output = model(**inputs, labels=labels)
    assert handle.labels.shape == output.logits.shape[:2]
    assert torch.isfinite(output.loss)
    for row in range(2):  # text is never dropped: every text label survives, in order
        assert torch.equal(handle.labels[row][handle.labels[row] != -100], labels[row][labels[row] != -100])


@pytest.fixture
def right_padded(fresh):
    model, processor = fresh
    processor.tokenizer.padding_side = "right"
    try:
        yield model, batch(processor, 3, seed=5)
    finally:
        processor.tokenizer.padding_side = "left"


def test_none_is_the_no_op_with_right_padding(right_padded):
    model, inputs = right_padded
    real = inputs["attention_mask"].bool()
    assert not real[:, -1].all()  # the batch is padded on the right
    with torch.no_grad():
        untouched = model(**inputs).logits
        with slimvlm.apply(model, "none"):
            applied = model(**inputs).logits
    assert applied.shape == untouched.shape
    torch.testing.assert_close(applied[real], untouched[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["fastv", "divprune:budget=40", "tome:r=8", ["tome:r=8", "vtu"]], ids=str)
def test_right_padded_samples_give_what_they_give_alone(right_padded, spec):
    model, inputs = right_padded
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        logits = model(**inputs).logits
        final_lengths = [entries[-1] for entries in handle.stats.kv_entries]  # real tokens at the last layer
        for index in range(3):
            alone = model(**select(inputs, index)).logits[0, -1]
            # rows stay padded on the right: a sample's last real token ends its real tokens
            torch.testing.assert_close(logits[index, final_lengths[index] - 1], alone, atol=1e-4, rtol=1e-4)


def test_outputs_carry_what_the_untouched_model_returns(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        untouched = model(**inputs, output_hidden_states=True)
        untouched_tuple = model(**inputs, return_dict=False)
        with slimvlm.apply(model, "divprune:budget=32"):
            applied = model(**inputs, output_hidden_states=True)
            applied_tuple = model(**inputs, return_dict=False)
    assert list(applied.keys()) == list(untouched.keys())
    assert len(applied_tuple) == len(untouched_tuple)
    assert len(applied.hidden_states) == len(untouched.hidden_states)
    assert applied.hidden_states[-1].shape[:2] == applied.logits.shape[:2]  # of the reduced sequence
    assert_visual_tokens(applied, [32, 32])


def test_images_of_another_size_are_refused(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    with torch.no_grad(), slimvlm.apply(model, "none"):
        assert model(**inputs, interpolate_pos_encoding=True).logits.shape[1] == inputs["input_ids"].shape[1]
        small = dict(inputs, pixel_values=inputs["pixel_values"][..., :224, :224])
        with pytest.raises(slimvlm.SlimVLMError, match="takes 336x336 images"):
            model(**small, interpolate_pos_encoding=True)


def sliding_window_model(tiny_dir, window: int):
    from transformers import LlavaForConditionalGeneration, MistralConfig

    from slimvlm.testbed.build import load

    base, _ = load(tiny_dir)
    text = base.config.text_config
    config = copy.deepcopy(base.config)
    config.text_config = MistralConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, sliding_window=window, pad_token_id=text.pad_token_id,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def test_sliding_window_language_models(tiny_dir):
    model = sliding_window_model(tiny_dir, window=64)  # far shorter than the 576-token image span
    from slimvlm.testbed.build import load

    _, processor = load(tiny_dir)
    inputs = batch(processor, 2)
    for spec in ("fastv", "mustdrop-llava7b-64", ["tome:r=8", "vtu"]):
        with pytest.raises(slimvlm.SlimVLMError, match="sliding window"):
            slimvlm.apply(model, spec)
    with torch.no_grad():
        untouched = model(**inputs).logits
        with slimvlm.apply(model, "none"):  # the LM builds its own sliding masks from slimvlm's 2D mask
            torch.testing.assert_close(model(**inputs).logits, untouched, atol=1e-5, rtol=1e-5)
        with slimvlm.apply(model, "divprune:budget=32"):
            assert torch.isfinite(model(**inputs).logits).all()
        # at batch 1, where CUDA graphs would replay the LM in segments with causal masks: not on a sliding window
        single = select(inputs, 0)
        alone = model(**single).logits
        with slimvlm.apply(model, "none"), HostReads() as reads, graphs_replayed_as_launches(reads):
            torch.testing.assert_close(model(**single).logits, alone, atol=1e-5, rtol=1e-5)


def test_a_static_cache_on_an_lm_windowed_on_every_layer(tiny_dir):
    """transformers caps every layer of such an LM's static cache at the window, and the cache then no longer says how
    many tokens generate() adds: refused by name. Where the window is longer than the prompt and its new tokens, the
    cache says it, and slimvlm's static cache (the LM's own forward filling it) generates what the dynamic one does."""
    from slimvlm.testbed.build import load

    _, processor = load(tiny_dir)
    inputs = batch(processor, 2)

    def generate(model, **options):
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **options)

    with torch.no_grad():
        short = sliding_window_model(tiny_dir, window=64)
        with slimvlm.apply(short, "divprune:budget=32"):
            says = "sliding window of 64 tokens on every layer.*generate without cache_implementation='static'"
            with pytest.raises(slimvlm.SlimVLMError, match=says):
                generate(short, cache_implementation="static")
        long = sliding_window_model(tiny_dir, window=inputs["input_ids"].shape[1] + 8)
        with slimvlm.apply(long, "divprune:budget=32") as handle:
            dynamic, static = generate(long), generate(long, cache_implementation="static")
            assert handle.runtime.session.static is not None
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [
    dict(num_beams=2), dict(do_sample=True, top_k=5), dict(num_return_sequences=2, do_sample=True), dict(use_cache=False),
    dict(num_beams=2, cache_implementation="static"),
], ids=lambda mode: ",".join(f"{k}={v}" for k, v in mode.items()))
def test_generate_modes_under_none_are_the_untouched_model(fresh, mode):
    model, processor = fresh
    inputs = batch(processor, 2)

    def generate():
        torch.manual_seed(0)
        return model.generate(**inputs, max_new_tokens=4, **mode)

    with torch.no_grad():
        untouched = generate()
        with slimvlm.apply(model, "none"):
            assert torch.equal(generate(), untouched)


@pytest.mark.parametrize("spec", ["divprune:budget=32", "fastv"])
def test_beam_search_batched_equals_one_by_one(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad(), slimvlm.apply(model, spec):
        batched = model.generate(**inputs, max_new_tokens=4, num_beams=2)
        for index in range(2):
            one = select(inputs, index)
            alone = model.generate(**one, max_new_tokens=4, num_beams=2)
            assert torch.equal(batched[index, inputs["input_ids"].shape[1]:], alone[0, one["input_ids"].shape[1]:])


def test_prompts_with_no_image_or_two_images(fresh):
    from conftest import images
    from slimvlm.testbed.build import format_prompt

    model, processor = fresh
    question = format_prompt("what colour is the circle ?")
    mixed = processor(images=images(1), text=[question, "USER: hello ASSISTANT:"], return_tensors="pt", padding=True)
    two = processor(images=images(2), text=[question.replace("<image>", "<image> <image>")], return_tensors="pt")
    with torch.no_grad():
        for inputs in (mixed, two):
            untouched = model(**inputs).logits
            with slimvlm.apply(model, "none"):
                assert torch.equal(model(**inputs).logits, untouched)
        with slimvlm.apply(model, "divprune:budget=32") as handle:
            model(**mixed)
            assert [row[0] for row in handle.stats.kv_visual_entries] == [32, 0]  # the text-only row has none
            model(**two)
            assert handle.stats.visual_tokens == [32, 32] and handle.stats.kv_visual_entries[0][0] == 64


def test_a_llava_next_checkpoint_loaded_as_llava_is_refused(tiny_dir, tmp_path):
    import json
    import shutil

    from slimvlm.testbed.build import load

    folder = tmp_path / "next-as-llava"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llava_next", image_grid_pinpoints=[[336, 672], [672, 336]])
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load(folder)  # transformers loads it, warning only
    with pytest.raises(slimvlm.SlimVLMError, match="LLaVA-NeXT checkpoint"):
        slimvlm.apply(model, "none")


def test_a_failure_while_installing_layer_hooks_leaves_none_behind(fresh, monkeypatch):
    """FastV's row probe is installed after the layers' pre-hooks: when it fails, the model must come back whole."""
    model, processor = fresh
    inputs = batch(processor)
    with torch.no_grad():
        reference = model(**inputs).logits
    layers = model.model.language_model.layers
    hooks_before = [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in layers]
    handle = slimvlm.apply(model, "fastv")

    def broken(self, layer):
        raise RuntimeError("no attention here")

    from slimvlm.models.llava import LlavaAdapter
    monkeypatch.setattr(LlavaAdapter, "attention_parts", broken)
    with pytest.raises(RuntimeError, match="no attention here"), torch.no_grad():
        model(**inputs)
    assert [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in layers] == hooks_before
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
