"""Train slimvlm's testbed VLM from scratch on procedurally drawn scenes.

Usage, from the repository root::

    python -m experiments.testbed.train --out DIR [--size testbed|tiny] [--minutes 9] [--device cuda]
        [--batch-size 192] [--lr 1e-3] [--eval-samples 800] [--workers N] [--seed 0] [--steps N]
        [--curriculum-steps 3000] [--init PREVIOUS_DIR] [--warmup-steps N] [--compile] [--token-dropout 0.25]

    # a chain of short calls: each saves its folder, the next continues from it
    python -m experiments.testbed.train --out run1 --minutes 8.5
    python -m experiments.testbed.train --out run2 --minutes 8.5 --init run1

Everything (CLIP vision tower, projector, Llama decoder) starts from random weights and is trained
on an endless stream of :mod:`slimvlm.testbed.scenes` samples (train split only), with the
language-model loss on the answer word and the closing eos (prompt tokens masked with -100) plus
auxiliary losses (:mod:`.losses`). The final accuracy is measured on the model *reloaded from disk*.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from slimvlm.errors import exit_code
from slimvlm.testbed import build, scenes

from .card import results_table
from .config import MODULE, SIZES, TrainConfig, config_from_argv, training_device
from .heldout import held_out_accuracy, held_out_batches
from .loader import training_loader
from .loop import train_steps
from .losses import AuxHeads
from .optimizer import adamw
from .outputs import count_parameters, save_model, write_results
from .resume import extend_chain, load_init
from .targets import word_bag_matrix


def train(config: TrainConfig | None = None, **kwargs: Any) -> Path:
    """Train and save the testbed model; returns the output folder. Accepts a TrainConfig or its fields."""
    if config is None:
        config = TrainConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    config.validate()
    t0 = time.perf_counter()
    device = training_device(config.device)
    cuda = device.type == "cuda"
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers after tokenising
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = build.build_tokenizer(scenes.vocabulary())
    processor = build.build_processor(tokenizer)
    init = load_init(config.init, tokenizer, config.size) if config.init is not None else None
    prior_steps = init.steps_done if init is not None else 0
    curriculum_offset = init.curriculum_step if init is not None else 0

    # Start the data workers first (before CUDA is initialised): they fill their queues
    # while the model and the held-out set are being built. The curriculum continues the
    # chain's global step count.
    dataset, loader, workers = training_loader(config, processor, curriculum_offset, config.resolved_workers(), cuda)
    batches = iter(loader)

    model, head = _new_model(config, tokenizer)
    aux_resumed = init.load_into(model, head, config.size) if init is not None else False
    model.to(device).train()
    head.to(device).train()
    eval_samples = scenes.make_samples(config.eval_samples, seed=0, split="test")
    eval_batches = held_out_batches(eval_samples, processor, config.eval_batch_size, device)
    del eval_samples
    optimizer = adamw([model, head], config.lr, config.weight_decay, fused=cuda)

    with open(out / "train_log.jsonl", "w") as log_file:

        def log(record: dict[str, Any]) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        # Step-0 evaluation: a chance-level baseline, and a measure of what the final one will cost.
        t_eval = time.perf_counter()
        baseline = held_out_accuracy(model, tokenizer, eval_batches, autocast=True)
        eval_s = time.perf_counter() - t_eval
        log({"step": 0, "chain_step": prior_steps, "elapsed_s": round(time.perf_counter() - t0, 2), "loss": None,
             "lm_loss": None, "aux_loss": None, "lr": 0.0, "eval_s": round(eval_s, 2), **baseline})  # fmt: skip
        result = train_steps(
            config, model, head, optimizer, batches, processor,
            evaluate=lambda: held_out_accuracy(model, tokenizer, eval_batches, autocast=True), log=log, t0=t0,
            reserve_s=2.0 * eval_s + 5.0, prior_steps=prior_steps, curriculum_offset=curriculum_offset,
        )  # fmt: skip
        del batches, loader  # stop the workers

        saved = save_model(model, processor, head, out)
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
        loaded, loaded_processor = build.load(out, dtype=saved.dtype, device=device)
        if count_parameters(loaded) != saved.params:
            raise RuntimeError("reloaded model has a different parameter count")
        t_eval = time.perf_counter()
        final = held_out_accuracy(loaded, loaded_processor.tokenizer, eval_batches, autocast=False)
        final_eval_s = time.perf_counter() - t_eval
        total_s = time.perf_counter() - t0
        log({"step": result.steps, "chain_step": prior_steps + result.steps, "elapsed_s": round(total_s, 2), "loss": None,
             "lm_loss": None, "aux_loss": None, "lr": None, "final": True, "eval_s": round(final_eval_s, 2), **final})  # fmt: skip

    step, samples = result.steps, result.steps * config.batch_size
    chain = extend_chain(init, config, result, final["accuracy"], total_s)
    vision, text = SIZES[config.size]
    inner = loaded.model
    info = {
        "size": config.size,
        "vision": vision,
        "text": text,
        "n_image_tokens": dataset.collate.n_image_tokens,
        "vocab_size": len(tokenizer),
        "params": {
            "vision": count_parameters(inner.vision_tower),
            "projector": count_parameters(inner.multi_modal_projector),
            "language": count_parameters(inner.language_model) + count_parameters(loaded.lm_head),
            "total": saved.params,
        },
        "save_dtype": str(saved.dtype).replace("torch.", ""),
        "file_bytes": saved.file_bytes,
        "file_mb": saved.file_bytes / 2**20,
        "questions_per_scene": config.questions_per_scene,
        "weight_decay": config.weight_decay,
        "lr": config.lr,
        "warmup_steps": config.resolved_warmup(),
        "batch_size": config.batch_size,
        "curriculum_steps": config.curriculum_steps,
        "token_dropout": config.token_dropout,
        "init": None if init is None else str(init.folder),
        "aux_resumed": aux_resumed,
        "chain": chain,
        "compile": config.compile,
        "compile_error": result.compile_error,
        "first_step_s": result.first_step_s,
        "steps": step,
        "samples": samples,
        "scenes_est": math.ceil(samples / config.questions_per_scene),
        "train_s": result.train_s,
        "total_s": total_s,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "workers": workers,
        "eval_samples": config.eval_samples,
        "eval_n": final["n"],
        "table": results_table(final, baseline, "at start (init) (%)" if init is not None else "before training (%)"),
        "command": config.command(),
    }
    write_results(out, info, final, baseline)

    print(f"\n{config.size} model: {saved.params:,} params, {info['file_mb']:.1f} MB ({info['save_dtype']}) -> {out}")
    print(f"{step:,} steps, {samples:,} samples in {result.train_s:.0f} s of training "
          f"({samples / max(result.train_s, 1e-9):.0f} samples/s), {total_s:.0f} s in all")  # fmt: skip
    if init is not None:
        print(f"chain: {len(chain['runs'])} runs, {chain['steps']:,} steps, {chain['samples']:,} samples, "
              f"{chain['minutes']:.1f} min (continued from {init.folder})")
    print(info["table"])
    return out


def _new_model(config: TrainConfig, tokenizer) -> tuple[LlavaForConditionalGeneration, AuxHeads]:
    """A randomly initialised model of ``config.size`` (seeded) and its aux heads."""
    vision, text = SIZES[config.size]
    model_config = build.llava_config(tokenizer, vision, text)
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration._from_config(model_config, attn_implementation="sdpa")
    model.generation_config = build.generation_config(tokenizer)
    return model, AuxHeads(model_config.vision_config.hidden_size, word_bag_matrix(tokenizer))


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: train(config_from_argv(argv)), MODULE)


if __name__ == "__main__":
    raise SystemExit(main())
