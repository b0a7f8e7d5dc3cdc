"""SN-Net training: one sampled stitch per iteration, as in the reference recipe.

Single process, or data-parallel under ``torchrun`` (PyTorch DDP: gloo on CPU, nccl on CUDA).
Each rank samples its own stitch every iteration, so DDP runs with unused-parameter detection.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .snnet import SNNet

TRAIN_STATE = "train_state.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``; written into the checkpoint's manifest."""

    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 1e-4  # peak learning rate (after warm-up)
    min_lr: float = 1e-6  # end of the cosine decay
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    sampling: str = "uniform"  # "uniform" over stitches, or "flops": a FLOPs group, then a stitch
    flops_groups: int = 10  # groups for "flops" sampling (SN-Netv2)
    mode: str = "full"  # "full": anchors and stitching layers; "stitching": stitching layers only
    anchor_lr_scale: float = 1.0  # anchors' lr relative to the stitching layers' (reference: 1)
    # Share of iterations that train an anchor's own route (drawn uniformly among the anchors),
    # the rest a stitched route drawn by `sampling`. None: the reference, where an anchor is one
    # route among all (1 in 35 iterations for three anchors, window 2).
    anchor_share: float | None = None
    distill: bool = False  # soft distillation from a frozen copy of the largest anchor
    distill_alpha: float = 0.5  # weight of the distillation term
    distill_tau: float = 1.0  # temperature of the distillation term
    amp: bool = False  # bfloat16 autocast on CPU, float16/bfloat16 on CUDA
    checkpoint_every: int = 1  # epochs between train-state checkpoints
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "flops"):
            raise ValueError(f"sampling must be 'uniform' or 'flops', got {self.sampling!r}")
        if self.mode not in ("full", "stitching"):
            raise ValueError(f"mode must be 'full' or 'stitching', got {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not 0 < self.lr < math.inf:  # (nan too)
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"min_lr (--min-lr) must be in [0, lr], the end of the decay from lr={self.lr:g}; "
                f"got {self.min_lr:g}"
            )
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < math.inf:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.anchor_share is not None and not 0 <= self.anchor_share < 1:
            raise ValueError(f"anchor_share must be in [0, 1) or None, got {self.anchor_share}")
        if self.anchor_share is not None and self.mode == "stitching":
            raise ValueError(
                "anchor_share (--anchor-share) needs mode='full' (--mode full): frozen anchors "
                "have nothing to train"
            )
        if not 0 <= self.anchor_lr_scale < math.inf:
            raise ValueError(f"anchor_lr_scale must be >= 0, got {self.anchor_lr_scale}")
        if self.anchor_lr_scale != 1.0 and self.mode == "stitching":
            raise ValueError(
                "anchor_lr_scale (--anchor-lr-scale) needs mode='full' (--mode full): frozen "
                "anchors are not trained at any rate"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 epoch, got {self.checkpoint_every}")


class StitchSampler:
    """Draws the stitch of each iteration from a seeded generator (one per rank).

    Args:
        gflops: Cost of every stitch, by id.
        mode: ``"uniform"`` over the candidates, or ``"flops"``: a FLOPs group uniformly, then a
            stitch within it (SN-Netv2).
        groups: Number of equal-width FLOPs groups.
        seed: Generator seed.
        candidates: Stitch ids to draw from (default: all).
        anchors: With ``anchor_share``, the anchors' ids: they are drawn (uniformly) in that
            share of iterations and are left out of the other draw.
        anchor_share: Share of iterations that draw an anchor (None: anchors are candidates like
            any other route).
    """

    def __init__(
        self,
        gflops: list[float],
        mode: str,
        groups: int,
        seed: int,
        candidates: list[int] | None = None,
        anchors: list[int] | None = None,
        anchor_share: float | None = None,
    ) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.ids = list(range(len(gflops))) if candidates is None else list(candidates)
        self.anchor_share = anchor_share
        self.anchors = list(anchors or [])
        if anchor_share is not None:
            if not self.anchors:
                raise ValueError("anchor_share needs the anchors' ids")
            self.ids = [i for i in self.ids if i not in self.anchors]
        if not self.ids:
            raise ValueError("no stitch to sample from")
        self.mode = mode
        if mode == "flops":
            costs = [gflops[i] for i in self.ids]
            lo, hi = min(costs), max(costs)
            width = (hi - lo) / groups or 1.0
            bins: dict[int, list[int]] = {}
            for i, g in zip(self.ids, costs, strict=True):
                bins.setdefault(min(int((g - lo) / width), groups - 1), []).append(i)
            self.groups = list(bins.values())

    def _pick(self, items: list[int]) -> int:
        return items[int(torch.randint(len(items), (1,), generator=self.gen))]

    def __call__(self) -> int:
        # With a share, one draw decides anchor or stitch in every iteration.
        share = self.anchor_share
        if share is not None and float(torch.rand((1,), generator=self.gen)) < share:
            return self._pick(self.anchors)
        if self.mode == "uniform":
            return self._pick(self.ids)
        return self._pick(
            self.groups[int(torch.randint(len(self.groups), (1,), generator=self.gen))]
        )


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to ``cfg.min_lr``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _param_groups(
    params: list[tuple[str, nn.Parameter]], weight_decay: float, anchor_lr_scale: float
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings, Swin's
    relative position bias tables included (as in timm); anchors' learning rate scaled by
    ``anchor_lr_scale`` relative to stitching layers."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    no_decay = ("token", "pos_embed", "relative_position_bias_table")
    for n, p in params:
        decay = p.ndim > 1 and not any(s in n for s in no_decay)
        groups.setdefault((n.startswith("anchors."), decay), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": anchor_lr_scale if is_anchor else 1.0,
        }
        for (is_anchor, decay), ps in groups.items()
    ]


def _dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (no-op without one). Returns (rank, world)."""
    rank, world, _ = _dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def train(
    net: SNNet,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    gflops: list[float],
    normalize: tuple[list[float], list[float]],
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``net`` in place and return per-epoch statistics.

    Args:
        net: The SN-Net (stitching layers already least-squares initialised).
        dataset: Yields ``(image (C, H, W) float in [0, 1], label)``; augmentation is its job.
        cfg: Hyper-parameters.
        out_dir: Where ``train_state.pt`` (model, optimiser, schedule, epoch) is kept.
        gflops: Cost of every stitch, for FLOPs-group sampling.
        normalize: ``(mean, std)`` per channel, from the checkpoint's preprocessing.
        device: Training device (with ``torchrun``, cuda uses ``LOCAL_RANK``).
        resume: Continue from ``out_dir/train_state.pt`` if it exists. The state keeps ``cfg``
            and ``settings``; a resume given other values says which (rank 0), and goes on
            with the new ones (``--epochs`` raised to train longer is the usual case).
        progress: Show a progress bar (rank 0 only) with loss, lr and images/s.
        settings: What else shapes the run, kept with the state (the CLI's data and
            augmentation, which are flags like the hyper-parameters and easy to leave out).
    """
    device = torch.device(device)
    rank, world, local_rank = _dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    setup_distributed(device)
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    net.to(device)
    if cfg.mode == "stitching":
        net.anchors.requires_grad_(False)
    teacher = None
    if cfg.distill:
        teacher = copy.deepcopy(net.anchors[-1]).eval().requires_grad_(False)
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        _param_groups(trainable, cfg.weight_decay, cfg.anchor_lr_scale), lr=cfg.lr
    )
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    sampler = (
        DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen if sampler is None else None,
        num_workers=cfg.num_workers,
        drop_last=True,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset of {len(dataset)} images is smaller than one batch of {cfg.batch_size}"
        )
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    # With frozen anchors, an anchor's own route has nothing to train: sample stitched routes only.
    candidates = [s.id for s in net.stitches if not (cfg.mode == "stitching" and s.is_anchor)]
    pick = StitchSampler(
        gflops,
        cfg.sampling,
        cfg.flops_groups,
        seed=cfg.seed * 1000 + rank,
        candidates=candidates,
        anchors=[s.id for s in net.stitches if s.is_anchor],
        anchor_share=cfg.anchor_share,
    )
    mean = torch.tensor(normalize[0], device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalize[1], device=device).view(1, -1, 1, 1)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(enabled=cfg.amp and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    state_path = out / TRAIN_STATE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as e:  # (a page of "size mismatch" lines)
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            head, _, keys = first.partition(": ")
            if keys.count(", ") > 2:  # (a line of every key: 95 of a ResNet-50's)
                first = f"{head}: {keys.count(', ') + 1} keys, {keys.split(', ')[0]}"
            made = state.get("settings", {}).get("net")  # (the CLI's flags for it)
            same = f"resume with the flags that built it ({made}), " if made else ""
            raise ValueError(
                f"{state_path} is the train state of another net ({first} ...); {same}give a "
                f"new --out, or leave out --resume to start this one over there"
            ) from None
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        gen.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        scaler.load_state_dict(state["scaler"])
        if len(state["stitch_rng"]) != world:
            raise ValueError(
                f"{state_path} was written by {len(state['stitch_rng'])} processes; resume with the same "
                f"number (got {world})"
            )
        pick.gen.set_state(state["stitch_rng"][rank])
        began = {**state.get("config", {}), **state.get("settings", {})}
        now = {**config_dict(cfg), **(settings or {})}
        changed = [k for k in now if k in began and began[k] != now[k]]
        if "labels" in changed:  # (folders of other classes, matched by sorted position)
            raise ValueError(
                f"{state_path}: the run began with the classes {', '.join(began['labels'])}, "
                f"this data has {', '.join(now['labels'])}; resume with the run's data (its "
                f"class folders named as then), or give a new --out to start another run"
            )
        if "input_size" in changed:  # (a ResNet takes any size: its weights load the same)
            raise ValueError(
                f"{state_path}: the run began at input size {began['input_size']}, this one is "
                f"{now['input_size']}; resume with --input-size "
                f"{','.join(map(str, began['input_size']))}"
            )
        if rank == 0:
            print(f"resumed from {state_path} at epoch {start_epoch}", file=sys.stderr)
            if changed:  # (a state from before session 29 keeps neither: nothing to say)
                print(
                    f"note: resuming with {', '.join(f'{k}={now[k]}' for k in changed)}, where "
                    f"the run began with {', '.join(f'{k}={began[k]}' for k in changed)}",
                    file=sys.stderr,
                )

    kept = {"config": config_dict(cfg), "settings": dict(settings or {})}  # (with each state)
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr
            )
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for i, (x, y) in enumerate(loader):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x = (x.to(device, non_blocking=True) - mean) / std
            y = y.to(device, non_blocking=True)
            stitch_id = pick()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                logits = model(x, stitch_id)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                    kd = (
                        F.kl_div(
                            F.log_softmax(logits.float() / cfg.distill_tau, -1),
                            F.log_softmax(t_logits / cfg.distill_tau, -1),
                            reduction="batchmean",
                            log_target=True,
                        )
                        * cfg.distill_tau**2
                    )
                    loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += x.shape[0] * world
            loss_sum += loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                )
        if bar is not None:
            bar.close()
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / steps_per_epoch,
                "images_per_s": seen / (time.perf_counter() - t0),
            }
        )
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            _save_state(state_path, net, opt, scaler, epoch + 1, history, gen, pick, world, kept)
    if world > 1:
        dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return history


def _save_state(
    path: Path,
    net: SNNet,
    opt,
    scaler,
    epoch: int,
    history,
    gen,
    pick: StitchSampler,
    world: int,
    kept: dict[str, Any],
) -> None:
    """Everything ``--resume`` needs, and ``kept`` (what the run was given); loaded back with
    ``torch.load(weights_only=True)``."""
    stitch_rng = [pick.gen.get_state()]
    if world > 1:
        gathered: list[torch.Tensor | None] = [None] * world
        dist.all_gather_object(gathered, stitch_rng[0])  # works on gloo and nccl alike
        stitch_rng = gathered
        if dist.get_rank() != 0:
            return
    state = {
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "history": history,
        "loader_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "stitch_rng": stitch_rng,
        **kept,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
