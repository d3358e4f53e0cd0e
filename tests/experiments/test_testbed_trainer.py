"""The testbed trainer (experiments/testbed): batches and targets, losses, schedule, a tiny CPU run and its chain."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from experiments.testbed import train as train_module
from experiments.testbed.config import TrainConfig
from experiments.testbed.curriculum import curriculum_cap, scene_complexity
from experiments.testbed.dataset import SceneQADataset, shorten_image_span
from experiments.testbed.loader import fit_loader_to_shm, max_text_tokens
from experiments.testbed.losses import AUX_HEADS_FILE, GUIDED_LAYER, AuxHeads, forward_losses
from experiments.testbed.optimizer import lr_factor
from experiments.testbed.resume import load_init
from experiments.testbed.targets import AUX_LABELS, GUIDED_GROUPS, patch_target, question_patches, word_bag_matrix
from experiments.testbed.train import main, train
from slimvlm.errors import SlimVLMError
from slimvlm.testbed import build as B
from slimvlm.testbed import scenes as S
from slimvlm.testbed.batches import normalize_pixels


@pytest.fixture(scope="module")
def processor():
    return B.build_processor(B.build_tokenizer(S.vocabulary()))


@pytest.fixture(scope="module")
def batch_and_records(processor):
    ds = SceneQADataset(processor, batch_size=5, seed=0, questions_per_scene=3)
    records = ds.records(ds.scene_seeds(0), 5)
    return ds.batch(records), records


def test_records_are_train_scenes_with_matching_images_and_aux(processor):
    ds = SceneQADataset(processor, batch_size=8, seed=0, questions_per_scene=2)
    records = ds.records(ds.scene_seeds(1), 8)
    test_seeds = {S.scene_seed(0, "test", k) for k in range(1000)}
    for r in records:
        assert r.scene_seed % 2 == 0 and r.scene_seed not in test_seeds
        scene = S.make_scene(r.scene_seed)  # the image is the scene the questions were asked about
        assert np.array_equal(r.image, np.asarray(scene.image))
        assert r.aux.sum() == len({(o.color, o.shape) for o in scene.objects}) + len(scene.words)
        for qt, q, a in r.qas:
            assert qt in S.QUESTION_TYPES and q and a
        assert len({qt for qt, _, _ in r.qas}) == len(r.qas)  # distinct types per scene
    a = list(zip(range(50), ds.scene_seeds(0)))
    b = list(zip(range(50), ds.scene_seeds(1)))
    assert not {s for _, s in a} & {s for _, s in b}  # workers draw distinct scenes


def test_question_patches_point_at_the_named_objects():
    pair = lambda c, sh: 1 + AUX_LABELS.index(f"{c} {sh}")  # noqa: E731
    word = 1 + AUX_LABELS.index("word:cat")
    patches = np.array([0, pair("red", "circle"), pair("blue", "circle"), pair("red", "square"), word, 0])
    ask = lambda q: [g.nonzero()[0].tolist() for g in question_patches(q, patches)]  # noqa: E731
    assert GUIDED_GROUPS == 2
    assert ask("what color is the square?") == [[3], [3]]  # one object: every head group reads it
    assert ask("what shape is the blue object?") == [[2], [2]]
    assert ask("how many circles are there?") == [[1, 2], [1, 2]]
    assert ask("how many objects are there?") == [[1, 2, 3], [1, 2, 3]]
    assert ask("is there a red circle?") == [[1], [1]]
    assert ask("is there a blue square?") == [[], []]  # absent: nothing to look at
    # two objects: the first named goes to group 0, the second to group 1
    assert ask("is the red square left or right of the blue circle?") == [[3], [2]]
    assert ask("is the red circle bigger or smaller than the red square?") == [[1], [3]]
    assert ask("which quadrant is the blue circle in?") == [[2], [2]]
    assert ask("what word is written?") == [[4], [4]]


def test_word_bag_names_what_covers_a_patch(processor):
    bag = word_bag_matrix(processor.tokenizer)
    vocab = processor.tokenizer.convert_ids_to_tokens
    assert bag[0].sum() == 0  # background names nothing
    red_circle = 1 + AUX_LABELS.index("red circle")
    assert sorted(vocab(bag[red_circle].nonzero().flatten().tolist())) == ["circle", "red"]
    cat = 1 + AUX_LABELS.index("word:cat")
    assert vocab(bag[cat].nonzero().flatten().tolist()) == ["cat"]


def test_question_types_stay_balanced(processor):
    ds = SceneQADataset(processor, batch_size=8, seed=3, questions_per_scene=3)
    seeds = ds.scene_seeds(0)
    for _ in range(40):
        ds._questions(next(seeds), 3)
    assert max(ds.counts) - min(ds.counts) <= 3


def test_shared_vision_forward_equals_stock_forward(processor, batch_and_records):
    batch, _ = batch_and_records
    torch.manual_seed(0)
    config = B.llava_config(processor.tokenizer, B.TINY_VISION, B.TINY_TEXT)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    head = AuxHeads(config.vision_config.hidden_size, word_bag_matrix(processor.tokenizer))
    pixels = normalize_pixels(batch["pixels"], processor)
    with torch.no_grad():
        lm, aux, correct = forward_losses(model, head, batch, pixels)
        ref = model(
            input_ids=batch["input_ids"],
            pixel_values=pixels[batch["image_index"]],
            attention_mask=(batch["input_ids"] != processor.tokenizer.pad_token_id).long(),
            labels=batch["labels"],
        )
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        ref_aux = torch.nn.functional.binary_cross_entropy_with_logits(head.cls(hidden[:, 0]), batch["aux_target"])
        ref_aux += torch.nn.functional.cross_entropy(head.patch(hidden[:, 1:]).flatten(0, 1), batch["patch_target"].flatten())
        # grid head: patch k of the 24x24 raster sits in row k // 24, column k % 24
        grid = head.grid(hidden[:, 1:])  # (S, 576, 48)
        rows = torch.tensor([k // 24 for k in range(576)]).repeat(len(pixels))
        cols = torch.tensor([k % 24 for k in range(576)]).repeat(len(pixels))
        ref_aux += 0.5 * torch.nn.functional.cross_entropy(grid[..., :24].flatten(0, 1), rows)
        ref_aux += 0.5 * torch.nn.functional.cross_entropy(grid[..., 24:].flatten(0, 1), cols)
        # word bag: projected patches scored against the LM's input embeddings
        projected = model.model.multi_modal_projector(hidden[:, 1:])
        unit = projected / projected.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        bag_logits = unit @ model.get_input_embeddings().weight[: len(processor.tokenizer)].T
        ref_aux += torch.nn.functional.binary_cross_entropy_with_logits(bag_logits, head.word_bag[batch["patch_target"]])
        # guided attention, read off eager attention probabilities of the stock model
        model.set_attn_implementation("eager")
        eager = model(
            input_ids=batch["input_ids"],
            pixel_values=pixels[batch["image_index"]],
            attention_mask=(batch["input_ids"] != processor.tokenizer.pad_token_id).long(),
            output_attentions=True,
        )
        model.set_attn_implementation("sdpa")
        probs = eager.attentions[GUIDED_LAYER]  # (B, heads, T, T)
        heads_per_group = probs.shape[1] // GUIDED_GROUPS
        assert any(not torch.equal(t[0], t[1]) for t in batch["attention_target"])  # a two-object question
        losses = []
        for i, row in enumerate(batch["labels"]):
            query = int((row != -100).nonzero()[0]) - 1
            image_positions = (batch["input_ids"][i] == model.config.image_token_id).nonzero().flatten()
            if not batch["attention_target"][i].any():
                continue
            group_losses = []
            for g, patches in enumerate(batch["attention_target"][i]):
                heads = probs[i, g * heads_per_group : (g + 1) * heads_per_group].mean(0)  # this group's heads
                group_losses.append(-torch.log(heads[query, image_positions[patches]].sum() + 1e-4))
            losses.append(torch.stack(group_losses).mean())
        assert losses  # the batch has questions with a target
        ref_aux += torch.stack(losses).mean()
    assert torch.allclose(lm, ref.loss, atol=1e-5)
    assert torch.allclose(aux, ref_aux, atol=1e-5)
    # teacher-forced accuracy of each row's first answer token, read off the stock logits
    for i, row in enumerate(batch["labels"]):
        first = int((row != -100).nonzero()[0])
        assert correct[i] == float(ref.logits[i, first - 1].argmax() == row[first])


def test_lr_schedule():
    assert lr_factor(0, 0.0, 300) == pytest.approx(1 / 300)
    assert lr_factor(299, 0.0, 300) == pytest.approx(1.0)
    assert lr_factor(5000, 0.5, 300) == pytest.approx(0.55)
    assert lr_factor(5000, 1.0, 300) == pytest.approx(0.1)
    assert lr_factor(5000, 2.0, 300) == pytest.approx(0.1)


def test_bad_input(tmp_path):
    with pytest.raises(SlimVLMError, match="unknown --size"):
        train(out=tmp_path, size="huge", device="cpu")
    with pytest.raises(SlimVLMError, match="--minutes"):
        train(out=tmp_path, size="tiny", device="cpu", minutes=0)
    with pytest.raises(SlimVLMError, match="--minutes"):
        train(out=tmp_path, size="tiny", device="cpu", minutes=-1)
    if not torch.cuda.is_available():
        with pytest.raises(SlimVLMError, match="no CUDA device is available"):
            train(out=tmp_path, size="tiny", device="cuda")
    assert main(["--out", str(tmp_path), "--size", "huge", "--device", "cpu"]) == 2
    assert not (tmp_path / "train_log.jsonl").exists()


TINY_RUN = dict(size="tiny", device="cpu", minutes=5, batch_size=4, eval_samples=8, eval_batch_size=4,
                workers=0, log_every=1, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 10-step tiny CPU training run (shared: the --init test continues it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return train(out=tmp_path_factory.mktemp("run") / "model", steps=10, eval_every=5, warmup_steps=2, **TINY_RUN)


def test_tiny_training_run(tiny_run):
    out = tiny_run
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["loss"] is not None]
    assert [r["step"] for r in train_lines] == list(range(1, 11))
    for r in train_lines:
        assert math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) and math.isfinite(r["aux_loss"])
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["aux_loss"], rel=1e-5)
    first = sum(r["lm_loss"] for r in train_lines[:2]) / 2
    last = sum(r["lm_loss"] for r in train_lines[-2:]) / 2
    assert last < first
    evals = [r for r in lines if "accuracy" in r]
    assert [r["step"] for r in evals] == [0, 5, 10] and evals[-1].get("final")
    assert set(evals[-1]["per_type"]) == set(S.QUESTION_TYPES)
    # the curriculum is on by default: early scenes are simple
    assert all(r["complexity_cap"] == pytest.approx(curriculum_cap(r["step"] - 1, 3000), abs=1e-4) for r in train_lines)
    assert max(r["scene_complexity"] for r in train_lines) < 0.35

    model, proc = B.load(out)
    assert model.config.vision_config.hidden_size == B.TINY_VISION["hidden_size"]
    assert model.dtype == torch.float32
    assert all(k.startswith(("model.", "lm_head.")) for k in model.state_dict())  # no aux head saved
    assert (out / AUX_HEADS_FILE).is_file()  # ... it is kept beside the model, for --init

    card = (out / "README.md").read_text()
    assert "| question type |" in card and "**overall**" in card and "python -m experiments.testbed.train" in card
    assert "Curriculum: " in card and "before training (%)" in card
    result = json.loads((out / "eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 8 and result["steps"] == 10
    assert result["chain"]["steps"] == 10 and result["chain"]["samples"] == 40 and len(result["chain"]["runs"]) == 1


def test_init_continues_the_chain(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    saved, _ = B.load(tiny_run)
    seen = []
    evaluate = train_module.held_out_accuracy

    def spy(model, *args, **kwargs):
        if not seen:  # the step-0 evaluation: the weights the second run starts from
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    def failing_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(train_module, "held_out_accuracy", spy)
    monkeypatch.setattr(torch, "compile", failing_compile)  # --compile falls back to eager training
    out = train(out=tmp_path / "next", init=str(tiny_run), steps=3, eval_every=100, compile=True, **TINY_RUN)

    for k, v in saved.state_dict().items():
        assert torch.equal(seen[0][k], v), k
    result = json.loads((out / "eval.json").read_text())
    first = json.loads((tiny_run / "eval.json").read_text())
    assert result["steps"] == 3 and result["init"] == str(tiny_run)
    assert result["compile_error"].startswith("RuntimeError: no compiler here")
    chain = result["chain"]
    assert chain["steps"] == 13 and chain["samples"] == 52 and len(chain["runs"]) == 2
    assert chain["curriculum_step"] == 13  # the curriculum went on where the first run left it
    assert chain["minutes"] == pytest.approx(first["chain"]["minutes"] + result["total_s"] / 60, abs=0.02)
    assert [r["init"] for r in chain["runs"]] == [None, str(tiny_run)]
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["chain_step"] for r in lines if r["loss"] is not None] == [11, 12, 13]
    assert lines[0]["accuracy"] == pytest.approx(first["accuracy"])  # starts where the first run ended
    card = (out / "README.md").read_text()
    assert "13 steps, 52 samples" in card and "(from scratch)" in card and "at start (init)" in card
    assert "with their saved aux heads" in card and "warmup 100 steps" in card
    assert "--init" in card and "--compile" in card  # the command reproduces the continuation


def test_init_from_a_folder_without_chain_record(tiny_run, tmp_path, processor):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_run, legacy)
    record = json.loads((legacy / "eval.json").read_text())
    del record["chain"]  # as written before chains were recorded (no curriculum either)
    (legacy / "eval.json").write_text(json.dumps(record))
    (legacy / AUX_HEADS_FILE).unlink()
    init = load_init(legacy, processor.tokenizer, "tiny")
    assert init.aux is None
    assert init.chain["steps"] == 10 and init.chain["samples"] == 40 and len(init.chain["runs"]) == 1
    assert init.chain["curriculum_step"] == 0  # its training had no curriculum: the ramp starts again


def test_init_needs_matching_sizes(tiny_run, tiny_dir, tmp_path):
    with pytest.raises(SlimVLMError, match=r"does not fit --size testbed \(it is a --size tiny model\).*hidden_size"):
        train(out=tmp_path / "a", init=str(tiny_run), size="testbed", device="cpu", workers=0, progress=False)
    with pytest.raises(SlimVLMError, match="scene vocabulary"):  # make_tiny's folder: tiny sizes, other words
        train(out=tmp_path / "b", init=str(tiny_dir), size="tiny", device="cpu", workers=0, progress=False)
    with pytest.raises(SlimVLMError, match="no config.json"):
        train(out=tmp_path / "c", init=str(tmp_path / "missing"), size="tiny", device="cpu")
    with pytest.raises(SlimVLMError, match="--out must differ"):
        train(out=tiny_run, init=str(tiny_run), size="tiny", device="cpu")
    assert main(["--out", str(tmp_path / "d"), "--init", str(tiny_run), "--device", "cpu"]) == 2
    assert not any((tmp_path / d / "train_log.jsonl").exists() for d in "abcd")


def test_curriculum_cap_ramps():
    assert curriculum_cap(0, 3000) == pytest.approx(0.15)
    assert curriculum_cap(1500, 3000) == pytest.approx(0.575)
    assert curriculum_cap(3000, 3000) == 1.0 and curriculum_cap(10**6, 3000) == 1.0
    assert curriculum_cap(0, 0) == 1.0 and curriculum_cap(50, 0) == 1.0  # 0 disables
    caps = [curriculum_cap(s, 100) for s in range(0, 120, 10)]
    assert caps == sorted(caps)
    draws = [scene_complexity(2 * k, 0.3) for k in range(200)]
    assert all(0.0 <= d <= 0.3 for d in draws) and max(draws) > 0.25 and min(draws) < 0.05
    assert draws == [scene_complexity(2 * k, 0.3) for k in range(200)]  # deterministic
    assert scene_complexity(8, 1.0) is None  # cap 1: exactly the standard scene of the seed


def test_curriculum_shapes_generated_scenes(processor):
    ds = SceneQADataset(processor, batch_size=30, seed=0, questions_per_scene=3, curriculum_steps=4)
    batches = iter(ds)  # in-process: one worker, so its batch k is global step k
    got = [next(batches) for _ in range(6)]
    caps = [float(b["complexity_cap"]) for b in got]
    assert caps == pytest.approx([0.15, 0.3625, 0.575, 0.7875, 1.0, 1.0])
    early, late = got[0]["complexity"], torch.cat([b["complexity"] for b in got[4:]])
    assert early.max() < 0.35 and early.mean() < 0.15
    assert late.mean() > 0.35 and late.max() > 0.7
    assert all(b["pixels"].shape[0] == 10 for b in got)  # always ceil(30 / 3) scenes
    assert max(ds.counts) - min(ds.counts) <= 3  # question types stay balanced under the curriculum
    # a continued chain starts where it left off
    resumed = SceneQADataset(processor, batch_size=30, seed=0, questions_per_scene=3, curriculum_steps=4, step_offset=4)
    assert float(next(iter(resumed))["complexity_cap"]) == 1.0


def test_compile_pads_to_one_width(processor):
    tok = processor.tokenizer
    longest = max_text_tokens(tok)
    ds = SceneQADataset(processor, batch_size=8, seed=0, questions_per_scene=3)
    seeds = ds.scene_seeds(0)
    for _ in range(30):
        for r in ds.records(seeds, 8):
            for _, q, a in r.qas:
                assert len(tok(B.format_training_text(q, a))["input_ids"]) <= longest
    ds.collate.min_width = longest + ds.collate.n_image_tokens - 1
    widths = {ds.batch(ds.records(seeds, 8))["input_ids"].shape[1] for _ in range(5)}
    assert widths == {ds.collate.min_width}
    command = TrainConfig(out="x", init="prev", compile=True, curriculum_steps=0).command()
    assert "--init prev" in command and "--compile" in command and "--curriculum-steps 0" in command
    assert "--compile" not in TrainConfig(out="x").command()


def test_loader_shrinks_to_fit_small_shm(monkeypatch):
    class Small:
        f_bavail, f_frsize = 64 * 1024 * 1024 // 4096, 4096  # Docker's default 64 MB /dev/shm

    monkeypatch.setattr(os, "statvfs", lambda path: Small())
    workers, prefetch = fit_loader_to_shm(14, 4, 11 * 2**20)
    assert prefetch == 2 and workers == 1
    assert fit_loader_to_shm(0, 4, 11 * 2**20) == (0, 4)


def test_patch_targets_mark_what_covers_each_patch():
    big = S.SceneObject("square", "red", x=14 * 5 + 7, y=14 * 2 + 7, size=40)
    tiny = S.SceneObject("circle", "blue", x=14 * 20 + 3, y=14 * 20 + 3, size=8)  # covers no patch centre
    word = S.WORDS[0]
    target = patch_target([big, tiny], [(word, (200.0, 100.0))], [24]).reshape(24, 24)
    red_square = 1 + AUX_LABELS.index("red square")
    assert target[2, 5] == red_square and target[1, 4] == red_square and target[4, 5] == 0
    assert target[20, 20] == 1 + AUX_LABELS.index("blue circle")
    assert target[100 // 14, 200 // 14] == 1 + AUX_LABELS.index(f"word:{word}")
    assert (target > 0).sum() < 30


def test_shorten_image_span_keeps_text_labels_and_targets_aligned(processor, batch_and_records):
    batch, _ = batch_and_records
    image_id = processor.tokenizer.convert_tokens_to_ids(B.SPECIAL_TOKENS["image"])
    short = shorten_image_span(batch, 10, image_id, np.random.default_rng(0))
    n = int((batch["input_ids"][0] == image_id).sum())
    assert short["input_ids"].shape[1] == batch["input_ids"].shape[1] - (n - 10)
    for i in range(len(batch["input_ids"])):
        full, cut = batch["input_ids"][i], short["input_ids"][i]
        assert int((cut == image_id).sum()) == 10
        # text outside the span and every label are unchanged, in order
        assert cut[cut != image_id].tolist() == full[full != image_id].tolist()
        assert short["labels"][i][short["labels"][i] != -100].tolist() == batch["labels"][i][batch["labels"][i] != -100].tolist()
        keep = short["visual_keep"][i]
        assert keep.tolist() == sorted(set(keep.tolist())) and int(keep.max()) < n
        assert short["attention_target"][i].tolist() == batch["attention_target"][i][:, keep].tolist()
    with pytest.raises(ValueError, match="keep"):
        shorten_image_span(batch, n + 1, image_id, np.random.default_rng(0))


def test_forward_losses_on_a_shortened_span(processor, batch_and_records):
    batch, _ = batch_and_records
    image_id = processor.tokenizer.convert_tokens_to_ids(B.SPECIAL_TOKENS["image"])
    short = shorten_image_span(batch, 12, image_id, np.random.default_rng(1))
    torch.manual_seed(0)
    config = B.llava_config(processor.tokenizer, B.TINY_VISION, B.TINY_TEXT)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    head = AuxHeads(config.vision_config.hidden_size)
    pixels = normalize_pixels(batch["pixels"], processor)
    with torch.no_grad():
        lm, _, _ = forward_losses(model, head, short, pixels)
        # reference: the chosen projected patches written into the shortened span by hand
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = model.model.multi_modal_projector(hidden)[batch["image_index"]]
        embeds = model.get_input_embeddings()(short["input_ids"]).clone()
        for i, keep in enumerate(short["visual_keep"]):
            embeds[i, short["input_ids"][i] == image_id] = features[i, keep]
        ref = model(inputs_embeds=embeds, labels=short["labels"])
    assert torch.allclose(lm, ref.loss, atol=1e-5)
