"""Build slimvlm's own small LLaVA-architecture model: config, tokenizer, processor.

slimvlm never downloads anything, so the test bed needs a LLaVA-1.5-shaped model
(CLIP vision tower -> MLP projector -> Llama decoder, one ``<image>`` placeholder
expanded to 576 visual tokens) that can be built from scratch. This module makes
the pieces with stock ``transformers``/``tokenizers`` classes so that everything
saved here loads back through the ordinary ``from_pretrained`` entry points,
offline, with the PIL image backend (torchvision is not required).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

__all__ = [
    "SPECIAL_TOKENS",
    "PROMPT",
    "TINY_VISION",
    "TINY_TEXT",
    "TINY_WORDS",
    "build_tokenizer",
    "format_prompt",
    "format_training_text",
    "build_processor",
    "llava_config",
    "make_tiny",
    "make_tiny_next",
    "make_tiny_next_video",
    "VIDEO_TOKEN",
    "make_tiny_onevision",
    "load",
]

SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "image": "<image>",
}

#: LLaVA-NeXT-Video's placeholder of a video, added to the tokenizer of make_tiny_next_video only.
VIDEO_TOKEN = "<video>"

#: Prompt template: the image placeholder(s), the question, then the cue "answer:".
PROMPT = "{images}\n{question} answer:"

#: Tiny sizes: big enough to exercise every code path, small enough for CPU tests.
TINY_VISION: dict[str, int] = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
TINY_TEXT: dict[str, int] = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)

#: A handful of words: enough for "what colour is the shape?"-style prompts.
TINY_WORDS: list[str] = [
    # question words and glue
    "what", "which", "is", "are", "it", "this", "the", "a", "an", "of", "in", "on", "there", "and",
    "color", "colour", "shape", "image", "picture", "how", "many", "left", "right", "top", "bottom",
    # answers
    "yes", "no", "one", "two", "three", "four",
    # colours
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple",
    # shapes
    "circle", "square", "triangle", "star",
    # punctuation
    "?", ",", ".",
]  # fmt: skip


def _normalizer() -> normalizers.Normalizer:
    """Lowercase only: "What" and "what" are one word."""
    return normalizers.Lowercase()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on whitespace, then isolate every punctuation char ("answer:" -> "answer", ":")."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _pieces(text: str) -> list[str]:
    """Split text exactly like the tokenizer will, so the vocabulary always matches encoding."""
    normalized = _normalizer().normalize_str(text)
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(normalized)]


def _template_words() -> list[str]:
    """Words and punctuation of the prompt template (minus placeholders), kept in every vocab."""
    text = PROMPT.replace("{question}", " ").replace("{images}", " ")
    for tok in SPECIAL_TOKENS.values():
        text = text.replace(tok, " ")
    return _pieces(text)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (plus specials and the template's words).

    Word-level keeps token ids human-readable and the vocabulary tiny, which is what
    a from-scratch test-bed model needs; it is a real ``tokenizers`` pipeline, so it
    saves as tokenizer.json and reloads with ``AutoTokenizer`` offline.
    """
    specials = list(SPECIAL_TOKENS.values())
    plain: set[str] = set(_template_words())
    for word in words:
        plain.update(_pieces(word))
    plain.difference_update(specials)
    vocab = {tok: i for i, tok in enumerate(specials + sorted(plain))}

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    # Specials are matched on the raw text before lowercasing/splitting ("<image>\n..." works).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    # No decoder: tokenizers then joins tokens with single spaces, which is what we want.

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        padding_side="left",  # decoder-only generation: pad on the left
        truncation_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def format_prompt(question: str, images: int = 1) -> str:
    """The inference prompt: one image placeholder per image (a clip's frames, in order), the
    question, the answer cue."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be an int >= 1, got {images!r}")
    return PROMPT.format(images=SPECIAL_TOKENS["image"] * images, question=question.strip())


def format_training_text(question: str, answer: str, images: int = 1) -> str:
    """Prompt + answer + eos, so a model learns to answer and then stop."""
    return f"{format_prompt(question, images)} {answer.strip()}{SPECIAL_TOKENS['eos']}"


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 336, patch_size: int = 14) -> LlavaProcessor:
    """LLaVA-1.5 processor: CLIP preprocessing (PIL backend) + ``<image>`` expansion.

    With CLS counted (``num_additional_image_tokens=1``) and dropped again by the
    "default" feature strategy, one ``<image>`` becomes (image_size/patch_size)^2
    placeholder tokens, matching the projected patch features one to one.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=SPECIAL_TOKENS["image"],
        num_additional_image_tokens=1,
    )


def llava_config(tokenizer: PreTrainedTokenizerFast, vision: dict, text: dict) -> LlavaConfig:
    """LLaVA-1.5-style config (CLIP tower, Llama decoder) sized by ``vision``/``text``.

    Token ids come from ``tokenizer`` so model, tokenizer and generation agree.
    ``vision`` may override image_size (336) and patch_size (14).
    """
    vision_kwargs = {"image_size": 336, "patch_size": 14, **vision}
    vision_config = CLIPVisionConfig(**vision_kwargs)
    text_kwargs = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text,
    }
    # transformers 5.x keeps RoPE settings in `rope_parameters`, not a top-level `rope_theta`.
    rope_theta = float(text_kwargs.pop("rope_theta"))
    text_kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    text_config = LlamaConfig(**text_kwargs)
    image_size, patch_size = vision_config.image_size, vision_config.patch_size
    image_token_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"])
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,  # alias of `image_token_index` in transformers 5.x
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, stop at eos, pad with pad: no 'pad_token_id not set' warnings."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def save_seeded(model_class, config, seed: int, tokenizer, folder: Path) -> None:
    """A float32 model of `config`, its init seeded without disturbing the caller's RNG (same seed ->
    bit-identical weights), with the testbed's generation config, saved to `folder` (safetensors only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(folder)


def make_tiny(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random LLaVA (float32 safetensors + processor) to ``folder``.

    Same ``seed`` -> bit-identical weights, so tests and benchmarks are reproducible.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(TINY_WORDS)
    processor = build_processor(tokenizer)
    config = llava_config(tokenizer, TINY_VISION, TINY_TEXT)
    save_seeded(LlavaForConditionalGeneration, config, seed, tokenizer, folder)
    processor.save_pretrained(folder)
    return folder


def next_fields(tokenizer: PreTrainedTokenizerFast, image_size: int) -> dict:
    """The config fields of a tiny LLaVA-NeXT (LlavaNextConfig's, which LlavaNextVideoConfig shares): the tiny
    LLaVA's sizes, crops of image_size px, image_grid_pinpoints of 1 x 2, 2 x 1 and 2 x 2 crops."""
    llava = llava_config(tokenizer, {**TINY_VISION, "image_size": image_size}, TINY_TEXT)
    return dict(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_id=llava.image_token_id,
        image_grid_pinpoints=[[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]],
        image_seq_length=llava.image_seq_length,
        vision_feature_layer=llava.vision_feature_layer,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        projector_hidden_act=llava.projector_hidden_act,
        tie_word_embeddings=False,
    )


def make_tiny_next(folder: str | Path, seed: int = 0, image_size: int = 336) -> Path:
    """Build and save a tiny random LLaVA-NeXT (AnyRes): the tiny LLaVA's tokenizer and sizes, crops of
    image_size px, image_grid_pinpoints of 1 x 2, 2 x 1 and 2 x 2 crops, so that images of different
    shapes get 2 or 4 tiles (and a base view). Same ``seed`` -> bit-identical weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(TINY_WORDS)
    config = LlavaNextConfig(**next_fields(tokenizer, image_size))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=SPECIAL_TOKENS["image"],
        num_additional_image_tokens=1,
    )
    save_seeded(LlavaNextForConditionalGeneration, config, seed, tokenizer, folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_next_video(folder: str | Path, seed: int = 0, image_size: int = 112, pool_mode: str = "average") -> Path:
    """Build and save a tiny random LLaVA-NeXT-Video: make_tiny_next's model (images as there) whose tokenizer
    adds VIDEO_TOKEN, frames pooled by `pool_mode` ('average', 'max' or 'conv') with stride 2. No processor is
    saved: transformers' LLaVA-NeXT-Video processor needs torchvision for its video part (tests take the images
    through LlavaNextImageProcessorPil and give frames as pixel tensors). Same ``seed`` -> bit-identical weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(TINY_WORDS)
    tokenizer.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    config = LlavaNextVideoConfig(
        **next_fields(tokenizer, image_size),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        spatial_pool_mode=pool_mode,
        spatial_pool_stride=2,
    )
    save_seeded(LlavaNextVideoForConditionalGeneration, config, seed, tokenizer, folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_onevision(folder: str | Path, seed: int = 0, image_size: int = 84) -> Path:
    """Build and save a tiny random LLaVA-OneVision: a SigLIP tower (no class token) of image_size-px crops, a
    Qwen2 LM of the tiny LLaVA's sizes with its tokenizer (and VIDEO_TOKEN), pinpoints of
    1-4 x 1-4 crops, so that the largest images are resized by anyres_max_9. No processor is saved: transformers'
    LLaVA-OneVision processor needs torchvision for its video part (LlavaOnevisionImageProcessorPil, built from
    the config, takes the images). Same ``seed`` -> bit-identical weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(TINY_WORDS)
    tokenizer.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION, image_size=image_size, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(
            **TINY_TEXT,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=[[image_size * rows, image_size * cols] for rows in range(1, 5) for cols in range(1, 5)],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    save_seeded(LlavaOnevisionForConditionalGeneration, config, seed, tokenizer, folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    model_class: type = LlavaForConditionalGeneration,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a saved model + processor from disk only (never touches the network); model_class:
    LlavaNextForConditionalGeneration for a folder make_tiny_next wrote."""
    model = model_class.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model = model.to(device).eval()
    # Pin the PIL image backend: identical preprocessing whether or not torchvision is installed
    # (AutoProcessor would otherwise pick the torchvision CLIPImageProcessor when it is importable).
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    return model, processor
