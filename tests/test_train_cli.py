"""`slimvlm train` on testbed scenes with the tiny model: both methods run and save what inference needs."""

from slimvlm.cli import main
from slimvlm.testbed.build import load
from slimvlm.train.data import SceneCollator, training_scenes


def test_scene_batches_label_only_the_answer():
    from slimvlm.testbed.build import build_processor, build_tokenizer
    from slimvlm.testbed.scenes import vocabulary

    processor = build_processor(build_tokenizer(vocabulary()))
    samples = training_scenes(3)
    batch = SceneCollator(processor)(samples)
    assert batch["pixel_values"].shape == (3, 3, 336, 336)
    for row, sample in zip(range(3), samples):
        answer = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(answer).split() == [sample.answer, "</s>"]


def test_train_dualspeed_and_llava_mini(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--samples", "8", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert main(["train", "--method", "dualspeed", "--pruner", "divprune:budget=16", "--r", "0.5", "--out", str(tmp_path / "ds"), *common]) == 0
    assert (tmp_path / "ds" / "dualspeed_isolator.safetensors").exists() and (tmp_path / "ds" / "model.safetensors").exists()
    assert main(["train", "--method", "llava-mini", "--budget", "4", "--layers", "1", "--out", str(tmp_path / "mini"), *common]) == 0
    model, _ = load(tmp_path / "mini")
    assert (tmp_path / "mini" / "llava_mini.safetensors").exists()
    assert main(["train", "--method", "tome", "--out", str(tmp_path / "x"), *common]) == 2
