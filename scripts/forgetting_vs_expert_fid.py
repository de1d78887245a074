"""The continual learner's MNIST forgetting against its MNIST expert's FID, one point per run, from a published study
(docs/studies/gan_vae_ablation.csv): does replay from better generators forget less?

    python scripts/forgetting_vs_expert_fid.py            # docs/figures/forgetting_vs_expert_fid.png and a table
    python scripts/forgetting_vs_expert_fid.py --csv docs/studies/gan_vae_ablation.csv --out /tmp/f.png

Only the rows that train experts of their own are drawn: the reference row and every row whose `expert_fid_mnist`
is not that of a row drawn before it (longer GAN training, averaged generators, ...). A branch row shares its trunk's
experts, so its points would only repeat the trunk's x values. Pearson's r over all drawn points is
printed and shown: with a few points per row it describes these runs, it is no test.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def own_expert_rows(values: list[dict], x: str) -> list[str]:
    """The reference row, then every row whose metric `x` (the expert's FID) is not, on every seed, that of a row
    already taken (a branch shares its trunk's experts, and the trunk comes first), in first-seen order."""
    from studies.summary import per_seed
    reference = next((v["row"] for v in values if v["reference"]), None)
    if reference is None:
        raise SystemExit("error: the values name no reference row (column `reference`)")

    def of(row):
        return per_seed(values, row, x)
    if not of(reference):
        raise SystemExit(f"error: the reference row '{reference}' has no metric '{x}'")
    rows = [reference]
    for row in dict.fromkeys(v["row"] for v in values):
        mine = of(row)
        if row in rows or not mine:
            continue
        if not any(all(taken.get(s) == value for s, value in mine.items()) for taken in map(of, rows)):
            rows.append(row)
    return rows


def points(values: list[dict], rows: list[str], x: str, y: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per row: (seed, x, y) of every seed that has both metrics."""
    from studies.summary import per_seed
    out = {}
    for row in rows:
        xs, ys = per_seed(values, row, x), per_seed(values, row, y)
        out[row] = [(s, xs[s], ys[s]) for s in sorted(set(xs) & set(ys))]
    return out


def pearson(pairs: list[tuple[float, float]]) -> float | None:
    """Pearson's r = sum((x - mx)(y - my)) / sqrt(sum((x - mx)^2) sum((y - my)^2)); None below 3 points or with a
    constant coordinate."""
    if len(pairs) < 3:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sxy = sum((a - mx) * (b - my) for a, b in pairs)
    sxx = sum((a - mx) ** 2 for a, _ in pairs)
    syy = sum((b - my) ** 2 for _, b in pairs)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=str(ROOT / "docs" / "studies" / "gan_vae_ablation.csv"),
                        help="a published study's values (row, seed, metric, value, reference)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures" / "forgetting_vs_expert_fid.png"))
    parser.add_argument("--x", default="expert_fid_mnist", help="the expert's metric (default: expert_fid_mnist)")
    parser.add_argument("--y", default="forgetting", help="the student's metric (default: forgetting)")
    args = parser.parse_args(argv)
    from studies.summary import read_values_csv
    path = Path(args.csv)
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: publish the study first (python study.py "
                         f"configs/studies/<name>.yaml --publish)")
    values = read_values_csv(path.read_text())
    drawn = points(values, own_expert_rows(values, args.x), args.x, args.y)
    r = pearson([(a, b) for pts in drawn.values() for _, a, b in pts])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row, pts in drawn.items():
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=row, s=36)
        for seed, a, b in pts:
            ax.annotate(f"s{seed}", (a, b), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(f"{args.x} (the MNIST expert's FID, lower is better)")
    ax.set_ylabel(f"{args.y} (%)")
    ax.set_title(f"one point per run; Pearson r = {'-' if r is None else f'{r:.2f}'}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"| row | seed | {args.x} | {args.y} |\n|---|---|---|---|")
    for row, pts in drawn.items():
        for seed, a, b in pts:
            print(f"| {row} | {seed} | {a:.2f} | {b:+.2f} |")
    print(f"Pearson r over {sum(map(len, drawn.values()))} runs: {'-' if r is None else f'{r:.3f}'}; figure: {out}")


if __name__ == "__main__":
    main()
