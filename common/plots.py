"""Plots of a run's metrics (curves.png).
"""
from __future__ import annotations

from pathlib import Path


def plot_curves(records: list[dict], path: Path, panels: list[tuple[str, list[str]]]) -> None:
    """One PNG with a panel per (title, [metric keys]) against epoch; keys absent from the records are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    epochs = [r["epoch"] + 1 for r in records]
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if any(key in r for r in records):
                ax.plot(epochs, [r.get(key, float("nan")) for r in records], marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

