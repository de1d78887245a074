"""Forgetting measures over a results matrix R[i][j]: the metric on task j after training on task i (j <= i).

All metrics here are lower-is-better (FID, MSE). Forgetting therefore takes the best (lowest) earlier value and
subtracts it from the final one, the mirror image of Chaudhry et al.'s accuracy form, so that positive forgetting
still means the task got worse. Backward transfer keeps Lopez-Paz and Ranzato's formula unchanged; only its reading
flips: for these metrics a positive BWT means the task got worse (with accuracy it would mean better).
"""
from __future__ import annotations

from pathlib import Path

from common.files import write_text_atomic


def forgetting(matrix: list[list[float | None]]) -> list[float | None]:
    """Chaudhry et al. (2018) forgetting, for lower-is-better metrics: for each task j before the last,

        f_j = R[T-1][j] - min_{j <= i < T-1} R[i][j]

    (final value minus the best value seen before the last task). The last task gets None."""
    t = len(matrix)
    out: list[float | None] = []
    for j in range(t):
        if j == t - 1:
            out.append(None)
            continue
        best = min(matrix[i][j] for i in range(j, t - 1))
        out.append(matrix[t - 1][j] - best)
    return out


def forgetting_percent(matrix: list[list[float | None]]) -> list[float | None]:
    """`forgetting` relative to the best value before the last task, in %; None (JSON null) where that best value
    is 0, since no percentage of 0 exists."""
    t = len(matrix)
    out: list[float | None] = []
    for j, f in enumerate(forgetting(matrix)):
        if f is None:
            out.append(None)
            continue
        best = min(matrix[i][j] for i in range(j, t - 1))
        out.append(100.0 * f / best if best else None)
    return out


def backward_transfer(matrix: list[list[float | None]]) -> float | None:
    """Lopez-Paz and Ranzato (2017) backward transfer: BWT = 1/(T-1) sum_{j < T-1} (R[T-1][j] - R[j][j]).
    For lower-is-better metrics a positive BWT means later tasks made earlier ones worse. None for T = 1."""
    t = len(matrix)
    if t < 2:
        return None
    return sum(matrix[t - 1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1)


def heatmap(matrix: list[list[float | None]], tasks: list[str], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    t = len(matrix)
    data = np.full((t, len(tasks)), np.nan)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = v
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.4 + 1.0 * t))
    im = ax.imshow(data, cmap="viridis_r")
    for i in range(t):
        for j in range(len(tasks)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
    short = [Path(s.split(":")[0]).stem + (":" + s.split(":", 1)[1] if ":" in s else "") for s in tasks]
    ax.set_xticks(range(len(tasks)), short, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(t), [f"after {s}" for s in short[:t]], fontsize=8)
    ax.set_xlabel("evaluated on task j")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, tasks: list[str], out_dir: Path) -> str:
    """forgetting_report.md and one heatmap PNG per matrix; returns the markdown."""
    keys = {"teacher_fid": "teacher FID (expert of task j)", "student_fid": "student sample FID",
            "recon_mse": "student reconstruction MSE", "recon_fid": "student reconstruction FID"}
    lines = ["# Forgetting report", "", f"Tasks: {', '.join(tasks)}. Experts: {results['experts']} "
             f"(task -> expert {results['task_to_expert']}). FID features: {results['fid']['backend']}, "
             f"fid.samples={results['fid']['samples']}; each FID is followed by the numbers of real and generated "
             "images it used, (n_real/n_fake).", "",
             "R[i][j] is the metric on task j after training task i; all are lower-is-better. Forgetting is "
             "R[T-1][j] - min over i < T-1 of R[i][j] (Chaudhry et al.'s form for a lower-is-better metric); BWT is "
             "the mean of R[T-1][j] - R[j][j] (Lopez-Paz and Ranzato's formula, unchanged). For both, positive "
             "means the earlier task got worse.", ""]

    def cell(v, n) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if n is None else f"{v:.4g} ({n[0]}/{n[1]})"

    for key, title in keys.items():
        m = results[key]
        counts = results.get(f"{key}_samples")
        lines += [f"## {title}", "", "| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for i, row in enumerate(m):
            lines.append(f"| {tasks[i]} | " + " | ".join(cell(v, counts[i][j] if counts else None)
                                                         for j, v in enumerate(row)) + " |")
        f, fp, bwt = results["forgetting"][key], results["forgetting_percent"][key], results["bwt"][key]
        lines += ["", "forgetting: " + ", ".join(
            f"{tasks[j]} {v:+.4g} ({'-' if fp[j] is None else f'{fp[j]:+.1f}%'})" for j, v in enumerate(f)
            if v is not None) if any(v is not None for v in f) else "forgetting: - (one task)",
            f"BWT: {'-' if bwt is None else f'{bwt:+.4g}'}", ""]
        heatmap(m, tasks, title, out_dir / f"heatmap_{key}.png")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out_dir / "forgetting_report.md", text)
    return text
