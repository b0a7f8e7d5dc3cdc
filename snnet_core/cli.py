"""Model-side commands of the ``snnet`` CLI: ``stitches``, ``profile``, ``train``, ``eval``,
``import``.

The console script itself lives in ``server.cli`` (it adds ``serve``); these commands only need
``snnet_core`` and also run as ``python -m snnet_core``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHTS_FILE, load, new_manifest, write_manifest
from .data import AUGMENTS
from .device import DTYPES, resolve_device, resolve_dtype
from .menu import StitchMenu
from .profile import measure_latency
from .snnet import SNNet, build_snnet
from .space import SpaceConfig, short_names

WINDOW, STRIDE = SpaceConfig.window, SpaceConfig.stride  # what --window and --stride default to
# Split names that are training data: `snnet eval --write` does not record accuracy on them.
TRAIN_SPLITS = ("train", "training")


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_overrides(text: str) -> dict[str, Any] | list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--overrides must be JSON: {e}") from None
    if isinstance(value, dict) or (
        isinstance(value, list) and all(isinstance(v, dict) for v in value)
    ):
        return value
    raise argparse.ArgumentTypeError(
        "--overrides must be a JSON object (for every anchor) or a list of objects (one per anchor)"
    )


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="checkpoint directory (model.safetensors + manifest.json)")
    src.add_argument("--anchors", help="timm model names, small to large, comma-separated")
    p.add_argument(
        "--overrides",
        type=parse_overrides,
        help="timm.create_model overrides with --anchors: JSON object for all anchors or a list, "
        'e.g. \'{"img_size": 32, "num_classes": 10}\'',
    )
    p.add_argument("--window", type=int, help=f"paired-stitching window (default {WINDOW})")
    p.add_argument("--stride", type=int, help=f"paired-stitching stride (default {STRIDE})")
    p.add_argument(
        "--input-size",
        type=parse_input_size,
        help="C,H,W for anchors that take any size (ResNet); default: the anchors' own",
    )


def positive_int(text: str) -> int:
    """An integer of at least 1 (``--limit 0`` evaluated every image)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_input_size(text: str) -> list[int]:
    values = parse_int_list(text)
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (3 positive integers), got {text!r}")
    return values


def _build_from_args(args: argparse.Namespace) -> SNNet:
    """The SN-Net that ``--anchors`` and its options describe (``--pretrained`` where offered)."""
    return build_snnet(
        args.anchors,
        pretrained=getattr(args, "pretrained", False),
        overrides=args.overrides,
        window=_window(args),
        stride=_stride(args),
        input_size=args.input_size,
    )


def _window(args: argparse.Namespace) -> int:
    return WINDOW if args.window is None else args.window


def _stride(args: argparse.Namespace) -> int:
    return STRIDE if args.stride is None else args.stride


def _check_source(args: argparse.Namespace) -> None:
    """A checkpoint (``--weights``) is its own net: the flags that build one from ``--anchors``
    are an error beside it (``--overrides '{"num_classes": 5}'`` with ``--weights`` trained and
    saved the checkpoint's 3 classes, and said nothing)."""
    if not args.weights:
        return
    given = [
        flag for flag, value in (
            ("--overrides", args.overrides), ("--window", args.window),
            ("--stride", args.stride), ("--input-size", args.input_size),
            ("--pretrained", getattr(args, "pretrained", False) or None),
        ) if value is not None
    ]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)} build{'s' if len(given) == 1 else ''} a new net from --anchors; "
            f"--weights {args.weights} is a checkpoint's net as it was built: leave "
            f"{'it' if len(given) == 1 else 'them'} out, or give --anchors instead of --weights"
        )


def spread(n: int, total: int) -> list[int]:
    """``n`` indices of ``range(total)``, evenly spaced from 0 (a split sorted by class keeps
    every class, in proportion)."""
    return [i * total // n for i in range(min(n, total))]


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _net_flags(args: argparse.Namespace) -> str:
    """The flags that made ``args``'s net, as a command line takes them: kept with a train
    state, so that a resume that builds another net can say what to give."""
    if args.weights:
        return f"--weights {shlex.quote(str(args.weights))}"
    flags = [f"--anchors {shlex.quote(args.anchors)}"]
    if args.overrides is not None:
        flags.append(f"--overrides {shlex.quote(json.dumps(args.overrides))}")
    flags += [f"--window {_window(args)}", f"--stride {_stride(args)}"]
    if args.input_size is not None:
        flags.append(f"--input-size {','.join(map(str, args.input_size))}")
    return " ".join(flags)


def _load_source(args: argparse.Namespace):
    _check_source(args)
    if args.weights:
        return load(args.weights)
    net = _build_from_args(args)
    return net, new_manifest(net)


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _with_cost_unit(rows: list[dict], menu: list[dict] | None = None) -> str:
    """Give ``rows`` a cost column in a unit that fits the table (``mflops`` when every stitch
    of ``menu``, default ``rows``, is under a GFLOP, as in the bundled model, where three
    decimals of GFLOPs printed 0.000); its name. (Some rows of a menu: the unit `snnet
    stitches` shows for the whole menu.)"""
    menu = rows if menu is None else menu
    if menu and max(r["gflops"] for r in menu) < 1.0:
        for r in rows:
            r["mflops"] = r["gflops"] * 1e3
        return "mflops"
    return "gflops"


def cmd_stitches(args: argparse.Namespace) -> int:
    _, manifest = _load_source(args)
    rows = [dict(r) for r in manifest.stitches]
    menu = StitchMenu.of(manifest.stitches)
    acc = menu.has_accuracy  # without accuracies a front would only say "cheaper"
    for r in rows:
        r["pareto"] = r["id"] in menu.pareto if acc else None
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        cost = _with_cost_unit(rows)
        anchors = manifest.config.anchors
        for short, a in zip(short_names([a.name for a in anchors]), anchors, strict=True):
            print(f"# {short}: {a.title}")
        cols = ["id", "description", "anchors", "cut", cost, "params_m", "accuracy"]
        print(_format_table(rows, cols + (["pareto"] if acc else [])))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    net: SNNet
    net, manifest = _load_source(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = net.to(device=device, dtype=dtype)
    ids = args.stitches or list(range(len(net.stitches)))
    print(
        f"profiling {len(ids)} stitches x batch sizes {args.batch_sizes} on {device} {args.dtype} "
        f"(warm-up {args.warmup}, median of {args.repeats})",
        file=sys.stderr,
    )
    profile = measure_latency(
        net, ids, args.batch_sizes, warmup=args.warmup, repeats=args.repeats, progress=True
    )
    rows = []
    for s in manifest.stitches:
        if s["id"] in profile.latency_ms:
            row = {"id": s["id"], "description": s["description"], "gflops": s["gflops"]}
            row.update({f"ms@{b}": ms for b, ms in profile.latency_ms[s["id"]].items()})
            rows.append(row)
    cost = _with_cost_unit(rows, manifest.stitches)
    times = [k for k in rows[0] if k.startswith("ms@")]
    print(_format_table(rows, ["id", "description", cost, *times]))
    if args.weights:
        manifest.set_profile(profile)
        path = write_manifest(args.weights, manifest)
        print(f"wrote profile {profile.fingerprint.key} into {path}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(profile.to_dict(), f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import save
    from .data import load_dataset, split_folder
    from .evaluate import evaluate
    from .train import TRAIN_STATE, TrainConfig, config_dict, train

    _check_source(args)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        # (a --lr under the default end of the decay: that end is --lr)
        min_lr=min(TrainConfig.min_lr, args.lr) if args.min_lr is None else args.min_lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        sampling=args.sampling,
        mode=args.mode,
        anchor_lr_scale=args.anchor_lr_scale,
        anchor_share=args.anchor_share,
        distill=args.distill,
        amp=args.amp,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.workers,
        seed=args.seed,
    )
    torch.manual_seed(cfg.seed)
    rank = int(os.environ.get("RANK", 0))

    # What happens before the first epoch's bar (imports, the anchors, the least-squares init:
    # 21 s of silence for DeiT at 224 px), said as it happens
    def say(text: str) -> None:
        if rank == 0:
            print(text, file=sys.stderr, flush=True)

    if (Path(args.out) / WEIGHTS_FILE).is_file() and not args.resume:
        say(f"note: {args.out} holds a checkpoint; this training replaces it (and its train "
            f"state) as it saves")  # fmt: skip
    t0 = time.perf_counter()
    if args.weights:
        net, manifest = load(args.weights)
        say(
            f"loaded {args.weights}: {len(net.stitches)} stitches ({time.perf_counter() - t0:.1f} s)"
        )
    else:
        net = _build_from_args(args)
        manifest = None
        say(f"built the SN-Net of {args.anchors}: {len(net.stitches)} stitches "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    pre = net.data_config() if manifest is None else manifest.preprocessing
    norm = (pre["mean"], pre["std"])
    device = resolve_device(args.device)
    # Fine-tuning keeps the checkpoint's labels: each class folder is the label of its name.
    data = load_dataset(
        args.data, args.train_split, pre, training=True,
        labels=None if manifest is None else manifest.labels, augment=args.augment,
    )  # fmt: skip
    labels = getattr(data, "classes", None) or (
        [str(i) for i in range(net.num_classes)] if manifest is None else manifest.labels
    )
    fresh = manifest is None  # a new net (not fine-tuning a checkpoint)
    if fresh and len(labels) < 2:
        raise ValueError(
            f"{split_folder(args.data, args.train_split)} holds one class folder ({labels[0]}): "
            f"a classifier needs at least two classes, one folder of images each"
        )
    if fresh:  # (its labels against the net's head: checked before the least-squares init)
        manifest = new_manifest(net, labels=list(labels))
        if args.data == "mnist":
            manifest.preprocessing["crop_pct"] = 1.0  # 28x28 digits, used as they are
    else:  # fine-tuning: the old accuracies no longer describe these weights
        for r in manifest.stitches:
            r["accuracy"] = None
            r.pop("top5", None)
        manifest.evaluation = {}
    _say_left_out(data, say)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # (DistributedSampler gives each process ceil(n / world) images; checked before the
    # least-squares init, not after)
    if math.ceil(len(data) / world) < cfg.batch_size:
        raise ValueError(
            f"{len(data)} training images{f' over {world} processes' if world > 1 else ''} are "
            f"fewer than one batch of --batch-size {cfg.batch_size} per process; give a "
            f"smaller --batch-size"
        )
    held = None
    if args.eval_split:  # checked (and read) before hours of training, not after
        if args.data != "mnist" and split_folder(args.data, args.eval_split) == split_folder(
            args.data, args.train_split
        ):
            raise ValueError(
                f"--eval-split {args.eval_split}: {args.data} holds its class folders directly "
                f"(no {args.eval_split}/ beside {args.train_split}/), so it would score the "
                f"images it trains on; give --data a folder with {args.train_split}/ and "
                f"{args.eval_split}/ sub-folders, or leave --eval-split out and run `snnet eval` "
                f"on a held-out folder"
            )
        held = load_dataset(
            args.data, args.eval_split, pre, training=False, labels=labels,
            labels_of="the model" if not fresh or args.data == "mnist"
            else f"the class folders of {split_folder(args.data, args.train_split)}",
        )  # fmt: skip
        _say_left_out(held, say)
    resuming = args.resume and (Path(args.out) / TRAIN_STATE).is_file()
    if args.resume and not resuming:
        say(f"note: --resume, but {Path(args.out) / TRAIN_STATE} is not there: starting afresh")
    if fresh and not resuming:
        # Least-squares init from real training images (the same on every rank: seeded).
        t0 = time.perf_counter()
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[
            : args.ls_images
        ]
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm)
        batch = (torch.stack([data[int(i)][0] for i in idx]) - mean) / std
        net.init_stitching_layers(batch)
        say(f"stitching layers least-squares initialised from {len(idx)} training images "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    history = train(
        net,
        data,
        cfg,
        args.out,
        gflops=[r["gflops"] for r in manifest.stitches],
        normalize=norm,
        device=device,
        resume=args.resume,
        progress=rank == 0,
        settings={
            "data": args.data,
            "train_split": args.train_split,
            "augment": args.augment,
            "input_size": list(net.input_size),
            "net": _net_flags(args),
            "labels": list(labels),
        },  # fmt: skip
    )
    if rank != 0:
        return 0
    net = net.cpu().eval()
    manifest.training = {
        "config": config_dict(cfg), "data": args.data, "train_split": args.train_split,
        "train_folder": _training_folder(args.data, args.train_split),
        "augment": args.augment, "history": history,
    }  # fmt: skip
    # Saved before the evaluation, so that an evaluation that fails (an unreadable image in the
    # split) leaves a checkpoint, not only a train state: it threw the whole run's result away.
    save(net, args.out, manifest)
    print(f"saved {args.out}", file=sys.stderr)
    if held is not None:
        try:
            res = evaluate(net, held, norm, device=device, progress=True)
        except ValueError as e:
            raise ValueError(
                f"{e}\n(the trained weights are saved in {args.out}, without accuracies; then "
                f"`snnet eval --weights {shlex.quote(str(args.out))} --data "
                f"{shlex.quote(str(args.data))} --split {shlex.quote(args.eval_split)} --write` "
                f"records them)"
            ) from None
        for r in manifest.stitches:
            r["accuracy"] = round(res[r["id"]]["top1"], 2)
            r["top5"] = _rounded(res[r["id"]]["top5"])
        # (float32's top-1 on record: `snnet eval --dtype bfloat16 --write` on the same split
        # then lets the server weigh bfloat16 against it)
        _record_evaluation(manifest, args.data, args.eval_split, len(held), "float32", res)
        write_manifest(args.out, manifest)  # (the weights as saved above)
        print(f"wrote the accuracies on {args.eval_split} into {args.out}", file=sys.stderr)
    if args.eval_split:  # what the training came to (it printed only "saved")
        rows = [dict(r) for r in manifest.stitches]
        cols = ["id", "description", _with_cost_unit(rows), "accuracy", "top5"]
        print(_format_table([{c: r.get(c) for c in cols} for r in rows], cols))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .evaluate import evaluate, plot_accuracy

    net, manifest = load(args.weights)
    if args.write:
        _check_held_out(manifest, args.data, args.split)
    device = resolve_device(args.device)
    net = net.to(device, resolve_dtype(args.dtype, device))
    pre = manifest.preprocessing
    data = load_dataset(args.data, args.split, pre, training=False, labels=manifest.labels)
    _say_left_out(data, lambda text: print(text, file=sys.stderr))
    total = len(data)
    if args.limit and args.limit < total:
        # Spread over the split, not its first N: splits come sorted by class (ImageFolder's,
        # MNIST's held-out set), and the first 200 digits were only 0s and 1s.
        data = torch.utils.data.Subset(data, spread(args.limit, total))
        if args.write:
            print(f"note: --write with --limit: the manifest's accuracies will be from {len(data)} "
                  f"of the split's {total} images", file=sys.stderr)  # fmt: skip
    res = evaluate(
        net,
        data,
        (pre["mean"], pre["std"]),
        stitch_ids=args.stitches,
        batch_size=args.batch_size,
        device=device,
        progress=True,
    )
    rows = []
    for r in manifest.stitches:
        if r["id"] in res:
            rows.append(
                {
                    "id": r["id"],
                    "description": r["description"],
                    "gflops": r["gflops"],
                    "top1": res[r["id"]]["top1"],
                    "top5": res[r["id"]]["top5"],
                }
            )
            if args.write and args.dtype == "float32":
                r["accuracy"] = round(res[r["id"]]["top1"], 2)
                r["top5"] = _rounded(res[r["id"]]["top5"])
    if args.write:
        _record_evaluation(manifest, args.data, args.split, len(data), args.dtype, res)
        write_manifest(args.weights, manifest)
        print(f"wrote {args.dtype} accuracies into {args.weights}/manifest.json", file=sys.stderr)
    if args.plot:
        plot_accuracy(
            [{**r, "accuracy": res[r["id"]]["top1"]} for r in manifest.stitches if r["id"] in res],
            args.plot,
        )
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:  # the cost in the unit `snnet stitches` shows it in
        unit = _with_cost_unit(rows, manifest.stitches)
        print(_format_table(rows, ["id", "description", unit, "top1", "top5"]))
    return 0


def _say_left_out(data, say) -> None:
    """Say which files of an image folder were left out as formats the server does not read."""
    if note := getattr(data, "note", lambda: "")():
        say(note)


def _training_folder(data: str, split: str) -> str | None:
    """The folder an image-folder training reads, as an absolute path (None for mnist): what
    the manifest records, so that `snnet eval --write` can tell it from a held-out one
    whatever directory either ran in."""
    from .data import split_folder

    return None if data == "mnist" else str(split_folder(data, split).resolve())


def _check_held_out(manifest, data: str, split: str) -> None:
    """``--write`` records the accuracies the server ranks stitches by and reports: not on the
    images the net was trained on (``snnet eval --split train --write`` replaced the held-out
    figures with training ones, and nothing said so). That is a split named as training data,
    or the one its training recorded (``snnet train`` records its folder; the bundled recipe
    does not)."""
    trained = manifest.training or {}
    same = split.lower() in TRAIN_SPLITS
    if data == "mnist":
        same |= trained.get("data") == "mnist" and split == trained.get("train_split", "train")
    elif trained.get("train_folder"):
        with contextlib.suppress(ValueError, OSError):  # (not a folder: load_dataset says so)
            same |= _training_folder(data, split) == trained["train_folder"]
    if same:
        raise ValueError(
            f"--write: split {split!r} of {data} is training data, and --write records held-out "
            f"accuracy (what the server ranks stitches by and reports); give a held-out split, "
            f"or leave --write out to see these figures"
        )


def _record_evaluation(manifest, data: str, split: str, images: int, dtype: str, res) -> None:
    """The manifest's ``evaluation``: what the accuracies are from, and top-1 per dtype (the
    server runs a dtype other than float32 only where it is within 0.5 point of it). Figures of
    other dtypes are kept while the dataset and split stay the same."""
    ev = manifest.evaluation
    same = ev.get("dataset") == data and ev.get("split") == split and ev.get("images") == images
    by_dtype = dict(ev.get("accuracy_by_dtype", {})) if same else {}
    by_dtype[dtype] = {str(s): round(r["top1"], 2) for s, r in sorted(res.items())}
    manifest.evaluation = {
        "dataset": data, "split": split, "images": images, "accuracy_by_dtype": by_dtype,
    }  # fmt: skip


def cmd_import(args: argparse.Namespace) -> int:
    from .checkpoint import save, sha256_file
    from .reference import convert_reference, read_state_dict

    if args.trust_pickle:
        print(
            f"warning: --trust-pickle: {args.src} may be fully unpickled, which runs any code "
            "it names; use it only on files from a source you trust",
            file=sys.stderr,
        )
    state, trusted = read_state_dict(args.src, trust_pickle=args.trust_pickle)
    anchors = [n.strip() for n in args.anchors.split(",") if n.strip()] if args.anchors else None
    net, report = convert_reference(
        state,
        args.family,
        anchors=anchors,
        overrides=args.overrides,
        input_size=args.input_size,
        trusted_pickle=trusted,
    )
    manifest = new_manifest(net)
    manifest.training = {
        "imported_from": {
            "file": Path(args.src).name,
            "sha256": sha256_file(args.src),
            **report.to_dict(),
        }
    }
    save(net, args.out, manifest)
    print(
        f"imported {report.tensors} tensors ({report.family}: {', '.join(report.anchors)}; "
        f"{len(net.stitches)} stitches) into {args.out}",
        file=sys.stderr,
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the model commands on a subparsers object."""
    p = sub.add_parser("stitches", help="print the stitch table of an anchor family or checkpoint")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_stitches)

    p = sub.add_parser("profile", help="measure per-stitch latency on this device")
    _add_source(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1], help="e.g. 1,8 (default 1)")
    p.add_argument("--stitches", type=parse_int_list, help="stitch ids to measure (default all)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", help="also write the profile as JSON to this file")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train an SN-Net (single process or under torchrun)")
    _add_source(p)
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start anchors from timm's pretrained weights (network)",
    )
    p.add_argument(
        "--data", required=True, help="'mnist' (bundled subset) or an ImageFolder directory"
    )
    p.add_argument(
        "--train-split", default="train", help="split / sub-folder to train on (default train)"
    )
    p.add_argument(
        "--eval-split", help="split / sub-folder to evaluate every stitch on after training"
    )
    p.add_argument(
        "--augment", choices=list(AUGMENTS), default="timm",
        help="an image folder's training augmentation: "
        + "; ".join(f"{k}: {v}" for k, v in AUGMENTS.items()).replace("%", "%%")
        + " (default timm). The bundled mnist: shifts of up to 2 pixels, unless none",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, help="output checkpoint directory (also holds train_state.pt)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--min-lr", type=float, help="end of the cosine decay (default 1e-6, or --lr if lower)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--sampling", choices=["uniform", "flops"], default="uniform")
    p.add_argument("--mode", choices=["full", "stitching"], default="full", help="what to train")
    p.add_argument(
        "--anchor-lr-scale", type=float, default=1.0,
        help="anchors' lr relative to the stitching layers' (default 1, as the reference)",
    )  # fmt: skip
    p.add_argument(
        "--anchor-share", type=float, default=None,
        help="share of iterations that train an anchor's own route, the rest a stitched route "
        "(default: none, as the reference: an anchor is one route among all)",
    )  # fmt: skip
    p.add_argument(
        "--distill", action="store_true", help="distil from a frozen copy of the largest anchor"
    )
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between train states")
    p.add_argument(
        "--ls-images", type=positive_int, default=100, help="images for least-squares init"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of every stitch on a dataset")
    p.add_argument("--weights", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="'mnist' or an ImageFolder directory")
    p.add_argument("--split", default="held_out", help="split / sub-folder (default held_out)")
    p.add_argument("--stitches", type=parse_int_list, help="stitch ids (default all)")
    p.add_argument(
        "--limit", type=positive_int,
        help="evaluate only N images, spread evenly over the split (every class of a sorted one)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--plot", help="write a PNG of accuracy vs GFLOPs (Pareto front, anchors marked)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="evaluate in this dtype (with --write: recorded per dtype; the server's "
        "SNNET_DTYPE=auto considers a dtype only where every stitch is within 0.5 point of float32)",
    )
    p.add_argument("--write", action="store_true", help="store the accuracies in the manifest")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "import",
        help="convert a reference SN-Net release file (ziplab/SN-Net .pth) into a checkpoint",
    )
    p.add_argument("src", help="the release file, e.g. snnet_deit.pth")
    p.add_argument("--family", required=True, choices=["deit", "swin", "resnet"])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling when torch.load(weights_only=True) refuses the file "
        "(runs code from the file: only for files you trust)",
    )
    p.add_argument("--anchors", help="timm names if not the release's (default: the release's)")
    p.add_argument(
        "--overrides", type=parse_overrides, help="timm.create_model overrides, as for stitches"
    )
    p.add_argument("--input-size", type=parse_input_size, help="C,H,W for ResNet-only files")
    p.set_defaults(func=cmd_import)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snnet", description="Stitchable Neural Networks")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # includes CheckpointError: a user-facing message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `snnet stitches --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0
    except OSError as e:  # a file that is not there or not readable, an image that is not one,
        # timm's weights hub out of reach: one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
