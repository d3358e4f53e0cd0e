"""Tests for slimvlm.testbed.build: tokenizer, processor, tiny model save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from slimvlm.testbed import build as B

N_IMAGE_TOKENS = (336 // 14) ** 2  # 576


@pytest.fixture(scope="module")
def tokenizer():
    return B.build_tokenizer(B.TINY_WORDS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return B.make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _images() -> list[Image.Image]:
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (300, 420, 3), dtype=torch.uint8, generator=rng).numpy()
    return [Image.new("RGB", (400, 300), "white"), Image.fromarray(noise)]


def _prompts() -> list[str]:
    return [B.format_prompt("what is it?"), B.format_prompt("what colour is the shape in the picture?")]


# --------------------------------------------------------------------------- tokenizer


def test_special_tokens_have_fixed_low_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in B.SPECIAL_TOKENS.values()]
    assert ids == list(range(len(B.SPECIAL_TOKENS)))
    assert tokenizer.pad_token == "<pad>" and tokenizer.unk_token == "<unk>"
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 2048


def test_template_words_always_in_vocab():
    tok = B.build_tokenizer(["red"])
    vocab = tok.get_vocab()
    for piece in ("answer", ":", "red"):
        assert piece in vocab
    ids = tok(B.format_prompt("red"))["input_ids"]
    assert tok.unk_token_id not in ids


def test_tokenizer_round_trip(tokenizer):
    prompt = B.format_prompt("What colour is the circle?")
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "<image>", "what", "colour", "is", "the", "circle", "?", "answer", ":",
    ]  # fmt: skip
    assert tokenizer.decode(ids, skip_special_tokens=True) == "what colour is the circle ? answer :"
    assert tokenizer.decode(ids) == "<s> <image> what colour is the circle ? answer :"


def test_unknown_word_maps_to_unk(tokenizer):
    ids = tokenizer("zebra is red", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.unk_token_id
    assert tokenizer.convert_ids_to_tokens(ids) == ["<unk>", "is", "red"]


def test_training_text_ends_with_eos(tokenizer):
    text = B.format_training_text("is it red?", "yes")
    assert text == "<image>\nis it red? answer: yes</s>"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert tokens[-3:] == [":", "yes", "</s>"]
    assert tokens.count("<s>") == 1


def test_left_padding(tokenizer):
    batch = tokenizer(["red", "is the circle red ?"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 6)
    assert ids[0, :4].tolist() == [tokenizer.pad_token_id] * 4
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert mask[1].tolist() == [1] * 6
    assert ids[0, 4].item() == tokenizer.bos_token_id


def test_tokenizer_saves_and_reloads(tokenizer, tmp_path, offline):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompt = B.format_prompt("which shape is blue?")
    assert again(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert again.padding_side == "left"
    assert again.get_vocab() == tokenizer.get_vocab()


# --------------------------------------------------------------------------- processor


def _check_batch(batch, image_token_id: int, pad_id: int) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 336, 336)
    assert (ids == image_token_id).sum(dim=1).tolist() == [N_IMAGE_TOKENS, N_IMAGE_TOKENS]
    n_pad = (mask == 0).sum(dim=1).tolist()
    assert n_pad[0] > 0 and n_pad[1] == 0  # first prompt is shorter -> padded
    assert mask[0, n_pad[0] :].all() and not mask[0, : n_pad[0]].any()  # pads on the left only
    assert (ids[0, : n_pad[0]] == pad_id).all()
    assert mask[:, -1].all()  # last position is real text for both rows


def test_processor_expands_image_token(tokenizer):
    processor = B.build_processor(tokenizer)
    batch = processor(images=_images(), text=_prompts(), return_tensors="pt", padding=True)
    _check_batch(batch, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    # CLIP normalisation: a white image maps to (1 - mean) / std in every channel
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(batch["pixel_values"][0].mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- tiny model


def test_saved_files_are_safetensors_only(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in names
    assert {"config.json", "tokenizer.json", "processor_config.json"} <= names
    bad = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert bad == []


def test_same_seed_same_weights(tiny_dir, tmp_path):
    a = load_file(tiny_dir / "model.safetensors")
    b = load_file(B.make_tiny(tmp_path / "again", seed=0) / "model.safetensors")
    c = load_file(B.make_tiny(tmp_path / "other", seed=1) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.float32}


def test_offline_load_forward_generate(tiny_dir, offline):
    model, processor = B.load(tiny_dir)
    assert not model.training
    assert model.dtype == torch.float32
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    cfg = model.config
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    batch = processor(images=_images(), text=_prompts(), return_tensors="pt", padding=True)
    _check_batch(batch, cfg.image_token_id, tok.pad_token_id)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3)
    assert out.shape[0] == 2
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
