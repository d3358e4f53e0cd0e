"""Plots of an evaluation: accuracy against visual tokens, and visual tokens against image complexity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .evaluate import MethodResult  # noqa: E402


def family(method: str) -> str:
    """'tome:r=8' -> 'tome', 'mustdrop-llava7b-64' -> 'mustdrop' (a preset is its method's); compositions
    keep every part's name ('tome+fastv')."""
    from ..registry import PRESETS

    names = (part.split(":")[0] for part in method.split("+"))
    return "+".join(PRESETS[name].split(":")[0] if name in PRESETS else name for name in names)


def plot_accuracy_vs_tokens(results: list[MethodResult], path: Path) -> Path:
    """One line per method family: accuracy against the visual tokens an LLM layer sees on average."""
    figure, axes = _axes()
    lines: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        if result.method == "none":
            axes.axhline(100 * result.accuracy, color="black", linestyle="--", label=f"none ({result.visual_tokens_mean:.0f} tokens)")
            continue
        lines.setdefault(family(result.method), []).append((result.llm_visual_tokens_mean, 100 * result.accuracy))
    for name, points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    return _save(figure, axes, path, "visual tokens per LLM layer (mean)", "accuracy (%)", "Accuracy against visual tokens")


def plot_tokens_vs_complexity(results: list[MethodResult], path: Path) -> Path | None:
    """For methods whose token count varies per image: tokens against the scene's complexity.
    None (no file) when no method's count varies."""
    varying = [r for r in results if r.visual_tokens_min != r.visual_tokens_max]
    if not varying:
        return None
    figure, axes = _axes()
    drawn = set()
    for result in varying:
        label = f"{family(result.method)} (mean {result.visual_tokens_mean:.0f})"
        if label in drawn:  # e.g. two MustDrop presets: the same encoder-side merge, the same counts
            continue
        drawn.add(label)
        points = [(r.complexity, r.visual_tokens) for r in result.records if r.complexity is not None]
        axes.scatter([p[0] for p in points], [p[1] for p in points], s=10, alpha=0.6, label=label)
    return _save(figure, axes, path, "scene complexity", "visual tokens reaching the LLM", "Token count against image complexity")


def _axes():
    """A figure whose colours do not repeat before 20 lines (the default cycle has 10)."""
    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    colors = plt.get_cmap("tab20").colors
    axes.set_prop_cycle(color=colors[::2] + colors[1::2])  # the 10 strong colours, then their light pairs
    return figure, axes


def _save(figure, axes, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def outline_merges(image, sources: list[int], grid: tuple[int, int]):
    """The image with each visual token's region outlined (from the source map: patch -> token)
    and dropped patches darkened, as an RGB array."""
    import numpy as np

    rows, cols = grid
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    height, width = pixels.shape[:2]
    ph, pw = height // rows, width // cols
    token = np.asarray(sources).reshape(rows, cols)
    for r in range(rows):
        for c in range(cols):
            block = pixels[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
            if token[r, c] < 0:
                block *= 0.25
                continue
            if c + 1 < cols and token[r, c + 1] != token[r, c]:
                block[:, -1] = (255, 0, 255)
            if r + 1 < rows and token[r + 1, c] != token[r, c]:
                block[-1, :] = (255, 0, 255)
    return pixels.astype("uint8")


def plot_source_maps(image, maps: dict[str, tuple[list[int], float]], grid: tuple[int, int], path: Path) -> Path:
    """One panel per method: which patches each visual token covers (outlines) and which were dropped before
    the LLM. maps: per method, (the source map, the visual tokens the LLM's layers keep on average), so that a
    method that drops inside the LLM too (MustDrop) is not titled by the tokens it hands over alone."""
    columns = min(4, len(maps))
    rows = -(-len(maps) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, (sources, in_layers)) in zip(axes.flat, maps.items()):
        kept = len({s for s in sources if s >= 0})
        ax.imshow(outline_merges(image, sources, grid))
        inside = "" if round(in_layers) == kept else f"; {in_layers:.0f} per LLM layer on average"
        ax.set_title(f"{name}\n{kept} tokens with patches{inside}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
