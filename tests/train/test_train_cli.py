"""`slimvlm train` on testbed scenes with the tiny model: both methods run and save what inference needs."""

import torch

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
    assert main(["train", "--method", "llava-mini", "--budget", "4", "--layers", "1", "--distill", "--out",
                 str(tmp_path / "taught"), *common]) == 0
    from safetensors.torch import load_file

    plain, taught = load_file(tmp_path / "mini" / "llava_mini.safetensors"), load_file(tmp_path / "taught" / "llava_mini.safetensors")
    assert any(not torch.equal(plain[key], taught[key]) for key in plain)  # the teacher's KL moved the modules
    assert main(["train", "--method", "tome", "--out", str(tmp_path / "x"), *common]) == 2


def test_train_resumes_from_a_checkpoint_to_the_same_weights(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    common = ["--method", "llava-mini", "--budget", "4", "--layers", "1", "--model", str(tiny_dir), "--samples", "8",
              "--steps", "4", "--batch-size", "2", "--device", "cpu", "--save-steps", "2"]
    assert main(["train", "--out", str(tmp_path / "straight"), *common]) == 0
    (tmp_path / "resumed" / "trainer").mkdir(parents=True)  # as if the run had stopped after step 2
    shutil.copytree(tmp_path / "straight" / "trainer" / "checkpoint-2", tmp_path / "resumed" / "trainer" / "checkpoint-2")
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", *common]) == 0
    for name in ("model.safetensors", "llava_mini.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(straight[key], resumed[key]) for key in straight), name
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", *common]) == 2  # nothing to resume
