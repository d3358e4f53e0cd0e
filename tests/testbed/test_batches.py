"""slimvlm.testbed.batches: training tensors exactly as LlavaProcessor builds them."""

import numpy as np
import pytest
import torch
from PIL import Image

from slimvlm.testbed import build as B
from slimvlm.testbed import scenes as S
from slimvlm.testbed.batches import Collator, normalize_pixels

QUESTIONS_OF_IMAGE = [0, 0, 0, 1, 1]  # several questions about one image, as the testbed trainer asks them


@pytest.fixture(scope="module")
def processor():
    return B.build_processor(B.build_tokenizer(S.vocabulary()))


@pytest.fixture(scope="module")
def samples_and_batch(processor):
    samples = S.make_samples(len(QUESTIONS_OF_IMAGE), seed=0, split="train")
    images = [np.asarray(samples[i].image, dtype=np.uint8) for i in sorted(set(QUESTIONS_OF_IMAGE))]
    batch = Collator(processor)(images, [s.question for s in samples], [s.answer for s in samples], QUESTIONS_OF_IMAGE)
    return samples, images, batch


def test_label_mask_covers_exactly_answer_and_eos(processor, samples_and_batch):
    samples, _, batch = samples_and_batch
    tok = processor.tokenizer
    assert batch["pixels"].shape[0] == 2 and batch["input_ids"].shape[0] == 5
    for row, sample in enumerate(samples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        real = int((ids != tok.pad_token_id).sum())
        assert (ids[real:] == tok.pad_token_id).all()  # right padding
        kept = (labels != -100).nonzero().flatten().tolist()
        n_answer = len(tok(sample.answer, add_special_tokens=False)["input_ids"])
        assert kept == list(range(real - n_answer - 1, real))  # the answer tokens, then eos
        assert tok.convert_ids_to_tokens(labels[kept].tolist()) == sample.answer.split() + ["</s>"]
        assert (labels[kept] == ids[kept]).all()
        # everything before is the prompt, exactly
        prompt_len = len(tok(B.format_prompt(sample.question))["input_ids"]) + Collator(processor).n_image_tokens - 1
        assert kept[0] == prompt_len


def test_collation_matches_processor(processor, samples_and_batch):
    samples, images, batch = samples_and_batch
    texts = [B.format_training_text(s.question, s.answer) for s in samples]
    ref = processor(text=texts, images=[Image.fromarray(images[i]) for i in QUESTIONS_OF_IMAGE], return_tensors="pt",
                    padding=True, padding_side="right")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    pixels = normalize_pixels(batch["pixels"], processor)[batch["image_index"]]
    assert torch.equal(pixels, ref["pixel_values"])  # bit-identical to the processor
