"""Per-stitch top-1 / top-5 accuracy on a dataset, and the accuracy-vs-GFLOPs plot."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .snnet import SNNet


@torch.inference_mode()
def evaluate(
    net: SNNet,
    dataset: Dataset,
    normalize: tuple[Sequence[float], Sequence[float]],
    *,
    stitch_ids: Sequence[int] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of each stitch: ``{id: {"top1", "top5", "n"}}``;
    top-5 is None for a net of 5 classes or fewer (every answer would be in it: 100%)."""
    device = torch.device(device)
    net = net.to(device).eval()
    ids = (
        list(range(len(net.stitches)))
        if stitch_ids is None
        else [net.stitch(i).id for i in stitch_ids]
    )
    dtype = next(net.parameters()).dtype
    mean = torch.tensor(normalize[0], device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(normalize[1], device=device, dtype=dtype).view(1, -1, 1, 1)
    k = min(5, net.num_classes)
    counts = {s: [0, 0] for s in ids}  # top-1, top-5 hits
    n = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc="eval", unit="img", file=sys.stderr)
    # One pass over the data (any size), every stitch on each batch.
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = (x.to(device, dtype) - mean) / std
        y = y.to(device)
        for s in ids:
            pred = net(x, s).topk(k, dim=-1).indices
            counts[s][0] += (pred[:, 0] == y).sum().item()
            counts[s][1] += (pred == y[:, None]).any(-1).sum().item()
        n += len(y)
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    results = {
        s: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n if net.num_classes > 5 else None, "n": n}
        for s, (c1, c5) in counts.items()
    }
    return results


def plot_accuracy(rows: list[dict], path: str, title: str = "SN-Net: accuracy vs GFLOPs") -> None:
    """PNG of top-1 against GFLOPs: every stitch, the Pareto front, the anchors marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .profile import pareto_front

    rows = [r for r in rows if r.get("accuracy") is not None]
    g = [r["gflops"] for r in rows]
    a = [r["accuracy"] for r in rows]
    front = pareto_front(g, a)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(g, a, s=18, c="tab:blue", alpha=0.6, label="stitches")
    ax.plot(
        [g[i] for i in front],
        [a[i] for i in front],
        "-o",
        c="tab:orange",
        ms=4,
        label="Pareto front",
    )
    anchors = [i for i, r in enumerate(rows) if len(r["anchors"]) == 1]
    ax.scatter(
        [g[i] for i in anchors],
        [a[i] for i in anchors],
        s=110,
        marker="*",
        c="tab:red",
        zorder=3,
        label="anchors",
    )
    for i in anchors:
        ax.annotate(
            rows[i]["description"].split("[")[0],
            (g[i], a[i]),
            textcoords="offset points",
            xytext=(5, -12),
            fontsize=8,
        )
    ax.set_xlabel("GFLOPs (multiply-adds per image)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # (best: "lower right" covered the largest anchor of a net whose largest is not its best)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
