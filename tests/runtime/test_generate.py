"""Batches whose images end with different token counts: generate() gives each sample what it gives alone."""

import pytest
import torch

import slimvlm
from conftest import batch, select

SPECS = ["none", "tome:r=8", "fastv:k=2,ratio=0.5", "divprune:budget=40", "visionzip:dominant=20,contextual=5", ["tome:r=8", "fastv:k=1,ratio=0.75"]]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_batched_generate_equals_one_by_one(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 3, seed=1)
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        batched = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        batch_tokens = handle.stats.visual_tokens
        for index in range(3):
            alone = model.generate(**select(inputs, index), max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
            assert handle.stats.visual_tokens == [batch_tokens[index]]
            new_batched = batched.sequences[index, inputs["input_ids"].shape[1]:]
            new_alone = alone.sequences[0, select(inputs, index)["input_ids"].shape[1]:]
            assert torch.equal(new_batched, new_alone)
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)


class CountDependent(slimvlm.Method):
    """A test method that leaves each image a different number of tokens (as DyMU does)."""

    name = "test-uneven"
    stages = frozenset({slimvlm.Stage.PROJECT})

    def project(self, tokens, context):
        keep = torch.zeros_like(tokens.valid)
        for image in range(tokens.batch_size):
            keep[image, : 100 + 150 * image] = True
        return tokens.keep(keep)


def test_images_with_different_token_counts(fresh):
    model, processor = fresh
    inputs = batch(processor, 3, seed=2)
    with torch.no_grad(), slimvlm.apply(model, CountDependent()) as handle:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert handle.stats.visual_tokens == [100, 250, 400]
        assert [row[0] for row in handle.stats.kv_visual_entries] == [100, 250, 400]
        # each sample alone gets the count it had in the batch: run the same method per sample
        for index in range(3):
            one = select(inputs, index)

            class Alone(CountDependent):
                def project(self, tokens, context, index=index):
                    keep = torch.zeros_like(tokens.valid)
                    keep[0, : 100 + 150 * index] = True
                    return tokens.keep(keep)

            handle.remove()
            with slimvlm.apply(model, Alone()):
                alone = model.generate(**one, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
            handle = slimvlm.apply(model, CountDependent())
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)
        handle.remove()


def test_keep_positions_option(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    with torch.no_grad():
        with slimvlm.apply(model, "uniform:budget=64"):
            renumbered = model(**inputs).logits[:, -1]
        with slimvlm.apply(model, "uniform:budget=64", keep_positions=True):
            kept = model(**inputs).logits[:, -1]
    assert not torch.allclose(renumbered, kept)


def test_labels_are_remapped_to_the_reduced_sequence(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = model(**inputs, labels=labels).loss
        with slimvlm.apply(model, "none"):
            assert torch.allclose(model(**inputs, labels=labels).loss, reference, atol=1e-5)
        with slimvlm.apply(model, "divprune:budget=32"):
            output = model(**inputs, labels=labels)
    assert output.logits.shape[1] == inputs["input_ids"].shape[1] - 576 + 32
    assert torch.isfinite(output.loss)


def test_handle_gives_the_labels_of_the_reduced_sequence(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=32") as handle:
        output = model(**inputs, labels=labels)
        assert handle.labels.shape == output.logits.shape[:2]
        # every text label survives, in order; the 32 visual positions carry -100
        for row in range(2):
            kept = handle.labels[row][handle.labels[row] != -100]
            assert torch.equal(kept, labels[row][(labels[row] != -100) & inputs["attention_mask"][row].bool()])
        model(**inputs)
        assert handle.labels is None


class FuseMean(slimvlm.Method):
    """A test stage-2 method: keep 8 tokens, add each image's mean visual feature to its text."""

    name = "test-fuse"
    stages = frozenset({slimvlm.Stage.PROJECT})

    def project(self, tokens, context):
        self.means = [tokens.x[i, : int(c)].mean(0) for i, c in enumerate(tokens.counts.tolist())]
        keep = torch.zeros_like(tokens.valid)
        keep[:, :8] = True
        return tokens.keep(keep)

    def fuse(self, text_embeds, tokens, context):
        self.images = context.image_of_sample
        shift = torch.stack([sum(self.means[i] for i in images) for images in context.image_of_sample])
        return text_embeds + shift[:, None, :], tokens


def test_stage2_methods_can_fuse_visual_information_into_the_text(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    method = FuseMean()
    with torch.no_grad(), slimvlm.apply(model, method) as handle:
        fused = model(**inputs).logits[:, -1]
        assert method.images == [[0], [1]] and handle.stats.visual_tokens == [8, 8]

    class NoFuse(FuseMean):
        def fuse(self, text_embeds, tokens, context):
            return text_embeds, tokens

    with torch.no_grad(), slimvlm.apply(model, NoFuse()):
        plain = model(**inputs).logits[:, -1]
    assert not torch.allclose(fused, plain)
