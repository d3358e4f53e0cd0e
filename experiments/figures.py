"""What the experiments' reports share: percentages for their tables, pyplot on a file backend (Agg: no display
needed), and figures saved alike."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pct(value) -> str:
    """A fraction as a table's percentage ('-' where there is none)."""
    return "-" if value is None else f"{100 * value:.1f}"


def save(fig, ax, path: Path, legend_size: int) -> Path:
    """Grid, legend, tight layout, 120 dpi: the figure written to path and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
