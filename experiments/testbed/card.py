"""The model card (README.md) a run writes beside its weights: architecture, data, recipe, the
training chain and the held-out accuracy, from the run's facts (``info``, assembled by
:func:`~.train.train`)."""

from __future__ import annotations

from typing import Any

from slimvlm.testbed import scenes

from .curriculum import CURRICULUM_START
from .dataset import DROPOUT_KEEPS
from .losses import AUX_HEADS_FILE, AUX_WEIGHT, GUIDED_LAYER
from .targets import AUX_LABELS, GUIDED_GROUPS


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def results_table(
    result: dict[str, Any], baseline: dict[str, Any] | None = None, baseline_label: str = "before training (%)"
) -> str:
    """Held-out accuracy per question type and overall (markdown), beside the baseline's if given."""
    head = "| question type | n | accuracy (%) |" + (f" {baseline_label} |" if baseline else "")
    sep = "|---|---:|---:|" + ("---:|" if baseline else "")
    rows = [head, sep]
    for t in scenes.QUESTION_TYPES:
        if t not in result["per_type"]:
            continue
        row = f"| {t} | {result['n_per_type'][t]} | {_fmt_pct(result['per_type'][t])} |"
        if baseline:
            row += f" {_fmt_pct(baseline['per_type'].get(t))} |"
        rows.append(row)
    row = f"| **overall** | {result['n']} | **{_fmt_pct(result['accuracy'])}** |"
    if baseline:
        row += f" {_fmt_pct(baseline['accuracy'])} |"
    rows.append(row)
    return "\n".join(rows)


def _curriculum_text(info: dict[str, Any]) -> str:
    n = info["curriculum_steps"]
    if n <= 0:
        return "No curriculum: every training scene's complexity is uniform in [0, 1]."
    return (
        f"Curriculum: a training scene's complexity is uniform in [0, cap], the cap rising linearly from "
        f"{CURRICULUM_START} (1-3 objects, little clutter) at global step 0 to 1 at global step {n:,} "
        f"(counted over the whole training chain) and staying at 1 after; this run ended at cap "
        f"{info['chain']['runs'][-1]['complexity_cap_end']:g}. The held-out set is never curriculum-shaped."
    )


def _chain_text(info: dict[str, Any]) -> str:
    chain = info["chain"]
    if info["init"] is None:
        return (
            f"- Training chain: this single run ({chain['steps']:,} steps). Continue it with "
            f"`--init <this folder>`."
        )
    rows = ["| run | continued from | steps | samples | batch | minutes | held-out accuracy (%) |",
            "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for i, r in enumerate(chain["runs"], 1):
        acc = r.get("accuracy")
        rows.append(
            f"| {i} | {r.get('init') or '(from scratch)'} | {r['steps']:,} | {r['samples']:,} | "
            f"{r.get('batch_size', '-')} | {r['minutes']:.1f} | {_fmt_pct(acc)} |"
        )
    resumed = "with their saved aux heads" if info["aux_resumed"] else "with new aux heads"
    return (
        f"- Training chain: this run continued `{info['init']}` (weights loaded, new optimizer, {resumed}, "
        f"warmup {info['warmup_steps']} steps); in all {len(chain['runs'])} runs, **{chain['steps']:,} steps, "
        f"{chain['samples']:,} samples, {chain['minutes']:.1f} minutes**:\n\n" + "\n".join(rows) + "\n"
    )


def model_card(info: dict[str, Any]) -> str:
    """The README.md of a run's folder."""
    v, t = info["vision"], info["text"]
    shapes, colors = ", ".join(scenes.SHAPES), ", ".join(scenes.COLORS)
    compiled = ""
    if info["compile"]:
        compiled = (
            f", training forward compiled with torch.compile (first step {info['first_step_s']:.0f} s)"
            if info["compile_error"] is None
            else f", torch.compile requested but failed ({info['compile_error'][:120]}), trained eagerly"
        )
    return f"""# slimvlm testbed VLM ({info['size']})

A small LLaVA-1.5-architecture vision-language model trained **from scratch** by
`experiments.testbed.train` on procedurally drawn scenes, so that slimvlm can measure
visual-token reduction on a real trained model without downloading anything.
Load it offline with `slimvlm.testbed.build.load(folder)`.

## Architecture

| part | configuration | parameters |
|---|---|---:|
| vision tower (CLIP) | {scenes.IMAGE_SIZE} px, patch 14 -> {info['n_image_tokens']} patches + CLS; hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads, MLP {v['intermediate_size']} | {info['params']['vision']:,} |
| projector | 2-layer MLP (GELU), {v['hidden_size']} -> {t['hidden_size']} | {info['params']['projector']:,} |
| language model (Llama) | hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads ({t['num_key_value_heads']} KV), MLP {t['intermediate_size']}, word-level vocab {info['vocab_size']} | {info['params']['language']:,} |
| **total** | feature layer -2, "default" selection (CLS dropped), SDPA attention | **{info['params']['total']:,}** |

Saved as {info['save_dtype']} safetensors: {info['file_mb']:.1f} MB.

## Data

Generated on the fly by `slimvlm.testbed.scenes` (train split: even scene seeds; the
held-out test split uses odd seeds, so no test scene is ever trained on). Each
{scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE} scene has 1-12 objects (shapes: {shapes};
colours: {colors}; small/medium/large), 0-2 written words (from {len(scenes.WORDS)}),
and background clutter (gradient, noise texture, distractor dots/lines).
Scene complexity (held-out set: uniform in [0, 1]):
`complexity = 0.5*(n_objects-1)/11 + 0.1*n_words/2 + 0.4*clutter`.
{_curriculum_text(info)}
Question types (one-word answers, balanced): {", ".join(scenes.QUESTION_TYPES)}.
Each rendered scene is used for {info['questions_per_scene']} different questions.

## Recipe

- Losses: next-token cross-entropy on the answer word + eos only (prompt masked),
  plus {AUX_WEIGHT} x the sum of: BCE of a training-only linear head on the vision CLS hidden
  state at the feature layer, predicting which (colour, shape) pairs and words are present
  ({len(AUX_LABELS)} labels); cross-entropy of per-patch heads predicting what covers each
  patch and the patch's grid row and column; the word bag (each projected patch, RMS-normalised,
  scored against the LM's input embeddings, BCE towards the words naming what covers it); and
  guided attention (-log of the attention mass that decoder layer {GUIDED_LAYER} puts, from the
  position predicting the answer, on the patches the question names, averaged over {GUIDED_GROUPS} head
  groups: with two named objects, each group reads one).
  The heads are not part of the model (`{AUX_HEADS_FILE}` keeps them for `--init` only).
- AdamW (betas 0.9/0.98, weight decay {info['weight_decay']} on matrices), peak lr {info['lr']:g},
  linear warmup {info['warmup_steps']} steps then cosine to 10% of peak over the wall-clock budget,
  grad clip 1.0, batch {info['batch_size']}, bf16 autocast on CUDA (TF32 matmuls){compiled}, all weights trained.
- Token dropout: a share {info.get('token_dropout', 0.0):g} of the batches had every image span cut to a random
  {' or '.join(map(str, DROPOUT_KEEPS))} of its patches, renumbered (0: none).
- This run: {info['steps']:,} steps, {info['samples']:,} samples ({info['scenes_est']:,} scenes approx.),
  {info['train_s']:.0f} s of training, {info['total_s']:.0f} s in all, on {info['device_name']}
  ({info['workers']} data workers).
{_chain_text(info)}

## Held-out accuracy

{info['eval_n']} test-split samples (`make_samples({info['eval_n']}, seed=0, split="test")`), greedy
decoding (3 new tokens, first word compared with the answer), measured on this folder
reloaded from disk ({info['save_dtype']}).

{info['table']}

## Command

```
{info['command']}
```
"""
