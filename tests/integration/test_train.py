"""Training and evaluation on the tiny real timm family and real MNIST digits."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import snnet_core
from snnet_core.cli import spread
from snnet_core.data import DigitsDataset, mnist_subset
from snnet_core.train import StitchSampler, TrainConfig, lr_at, train
from tests._cli import ENV, snnet
from tests.conftest import TINY_ANCHORS, TINY_NUM_STITCHES, TINY_OVERRIDES, build_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_train():
    x, y = mnist_subset("train")
    return DigitsDataset(x[::8].contiguous(), y[::8].contiguous())  # 500 digits


def mean_loss(net, data, norm):
    x = torch.stack([data[i][0] for i in range(128)])
    y = torch.stack([data[i][1] for i in range(128)])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm)
    with torch.no_grad():
        return (
            sum(
                F.cross_entropy(net.eval()((x - mean) / std, s), y).item()
                for s in range(TINY_NUM_STITCHES)
            )
            / TINY_NUM_STITCHES
        )


@pytest.mark.parametrize("mode", ["full", "stitching"])
def test_training_lowers_the_loss_and_updates_what_it_should(mode, small_train, tmp_path):
    net = build_tiny(seed=1)
    pre = net.data_config()
    norm = (pre["mean"], pre["std"])
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    before = mean_loss(net, small_train, norm)
    cfg = TrainConfig(epochs=4, batch_size=25, lr=2e-3, warmup_epochs=0.5, mode=mode)
    history = train(
        net,
        small_train,
        cfg,
        tmp_path,
        gflops=[c.gflops for c in snnet_core.stitch_costs(net)],
        normalize=norm,
        progress=False,
    )
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    assert mean_loss(net, small_train, norm) < before
    after_state = net.state_dict()
    anchors_changed = any(
        not torch.equal(before_state[k], after_state[k])
        for k in after_state
        if k.startswith("anchors.")
    )
    layers_changed = [
        not torch.equal(before_state[k], after_state[k])
        for k in after_state
        if k.startswith("stitch_layers.")
    ]
    assert all(layers_changed)  # 4 epochs x 20 steps: every layer gets sampled
    assert anchors_changed == (mode == "full")
    assert (tmp_path / "train_state.pt").is_file()


def test_anchor_lr_scale_zero_freezes_the_anchors_only(small_train, tmp_path):
    net = build_tiny(seed=3)
    pre = net.data_config()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(
        epochs=1, batch_size=25, lr=2e-3, warmup_epochs=0, anchor_lr_scale=0.0, weight_decay=0.0
    )
    train(
        net,
        small_train,
        cfg,
        tmp_path,
        gflops=[1.0] * TINY_NUM_STITCHES,
        normalize=(pre["mean"], pre["std"]),
        progress=False,
    )
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("anchors."))
    assert any(
        not torch.equal(before[k], after[k]) for k in after if k.startswith("stitch_layers.")
    )


def test_resume_continues_from_the_saved_epoch(small_train, tmp_path, capsys):
    pre = build_tiny().data_config()
    norm = (pre["mean"], pre["std"])
    kw = dict(gflops=[1.0] * TINY_NUM_STITCHES, normalize=norm, progress=False)
    full = build_tiny(seed=2)
    train(full, small_train, TrainConfig(epochs=2, batch_size=50, lr=1e-3), tmp_path / "a", **kw)
    part = build_tiny(seed=2)
    cfg = TrainConfig(epochs=1, batch_size=50, lr=1e-3)
    flags = "--anchors tiny_a,tiny_b --window 2 --stride 1"  # (what the CLI keeps: its flags)
    began = {"augment": "no-flip", "input_size": [1, 28, 28], "net": flags}
    train(part, small_train, cfg, tmp_path / "b", settings=began, **kw)
    resumed = build_tiny(seed=99)  # weights come from the train state, not from this init
    capsys.readouterr()
    history = train(
        resumed,
        small_train,
        TrainConfig(epochs=2, batch_size=50, lr=1e-3),
        tmp_path / "b",
        resume=True,
        settings={"augment": "timm", "input_size": [1, 28, 28], "net": flags},
        **kw,
    )
    assert [h["epoch"] for h in history] == [1, 2]
    # What differs from what the run began with is said (a flag left out on resume, such as
    # --augment, silently changed the run): here the longer schedule, and the augmentation.
    assert (
        "note: resuming with epochs=2, augment=timm, where the run began with epochs=1, "
        "augment=no-flip" in capsys.readouterr().err
    )
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    # Another input size (a ResNet's weights load whatever the size; a resume without
    # --input-size trained at 224 where the run began at 64): an error naming the size.
    with pytest.raises(ValueError, match=r"began at input size \[1, 28, 28\], this one is \[1, 32"):
        train(build_tiny(seed=2), small_train, TrainConfig(epochs=3, batch_size=50, lr=1e-3),
              tmp_path / "b", resume=True, settings={"input_size": [1, 32, 32]}, **kw)  # fmt: skip
    # Another net's train state in that folder: an error that says so, not a page of "size
    # mismatch" lines
    wider = [{**o, "embed_dim": o["embed_dim"] + 8} for o in TINY_OVERRIDES]
    other = snnet_core.build_snnet(TINY_ANCHORS, overrides=wider)
    # (naming the flags that built the net the run began with)
    with pytest.raises(ValueError, match="is the train state of another net .*size mismatch") as e:
        train(other, small_train, TrainConfig(epochs=2), tmp_path / "b", resume=True, **kw)
    assert f"resume with the flags that built it ({flags})" in str(e.value)


def test_schedule_and_sampling():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    gflops = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0]
    uni = StitchSampler(gflops, "uniform", 2, seed=0)
    grp = StitchSampler(gflops, "flops", 2, seed=0)
    n = 4000
    assert abs(sum(uni() == 8 for _ in range(n)) / n - 1 / 9) < 0.03
    assert abs(sum(grp() == 8 for _ in range(n)) / n - 1 / 2) < 0.03
    # anchor_share: anchors (ids 0, 8) take that share, split evenly; the rest never draws them.
    share = StitchSampler(gflops, "uniform", 2, seed=0, anchors=[0, 8], anchor_share=0.3)
    draws = [share() for _ in range(n)]
    assert abs(draws.count(0) / n - 0.15) < 0.03 and abs(draws.count(8) / n - 0.15) < 0.03
    assert abs(sum(d in (1, 2, 3, 4, 5, 6, 7) for d in draws) / n - 0.7) < 0.03
    with pytest.raises(ValueError, match="sampling must be"):
        TrainConfig(sampling="nope")
    with pytest.raises(ValueError, match="anchor_share must be"):
        TrainConfig(anchor_share=1.0)
    with pytest.raises(ValueError, match="frozen anchors"):
        TrainConfig(anchor_share=0.2, mode="stitching")


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"lr": 1e-4, "min_lr": 1e-2}, r"min_lr \(--min-lr\) must be in \[0, lr\]"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"warmup_epochs": -1.0}, "warmup_epochs must be >= 0"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\)"),
        ({"mode": "stitching", "anchor_lr_scale": 0.5}, "frozen anchors are not trained"),
    ],
)
def test_a_hyper_parameter_out_of_range_is_an_error_before_anything_runs(values, error):
    """Each was taken without a word (a negative weight decay, a min_lr above lr), or failed
    with a traceback deep in training (label smoothing 1.5), or only after the least-squares
    init (lr nan)."""
    with pytest.raises(ValueError, match=error):
        TrainConfig(**values)


def test_two_process_torchrun_on_cpu_ends_with_identical_weights(tmp_path):
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # rendezvous on a free local port
            "--nproc-per-node",
            "2",
            str(ROOT / "tests/integration/ddp_worker.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = safetensors.torch.load_file(tmp_path / "rank0.safetensors")
    r1 = safetensors.torch.load_file(tmp_path / "rank1.safetensors")
    start = build_tiny(seed=0).state_dict()
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.equal(r0[k], start[k]) for k in r0)


def test_top5_is_none_for_five_classes_or_fewer():
    """Every answer is among the top 5 of 5 classes: a top-5 of 100% says nothing, and read as
    a measurement it misled (a 3-class model's table showed 100.00 for every stitch)."""
    from torch.utils.data import TensorDataset

    from snnet_core.evaluate import evaluate

    x, y = mnist_subset("held_out")
    keep = (y < 3).nonzero().squeeze(1)[::10]  # digits 0, 1, 2
    data = TensorDataset(x[keep], y[keep])
    norm = ([0.5], [0.5])
    for classes, top5 in ((3, None), (10, float)):
        torch.manual_seed(0)
        net = snnet_core.build_snnet(
            TINY_ANCHORS, overrides=[{**o, "num_classes": classes} for o in TINY_OVERRIDES]
        )
        res = evaluate(net, data, norm, stitch_ids=[0, 5])
        for r in res.values():
            assert 0.0 <= r["top1"] <= 100.0 and r["n"] == len(keep)
            assert r["top5"] is None if top5 is None else isinstance(r["top5"], float)


def test_eval_gives_the_right_numbers_on_a_known_case(tmp_path):
    net = build_tiny(seed=4)
    # Anchor 0 always answers "1": zero weights, bias for class 1, runner-up classes 2..5.
    head = net.anchors[0].head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 9, 8, 7, 6, 5, -1, -2, -3, -4]))
    snnet_core.save(net, tmp_path)
    # --limit 300 of the held-out split, which is sorted by label: spread over it, every class
    # in (its first 300 were only 0s, 1s and 2s)
    proc = snnet(
        "eval", "--weights", str(tmp_path), "--data", "mnist", "--limit", "300",
        "--stitches", "0,1,7", "--json", "--write", "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert "note: --write with --limit: the manifest's accuracies will be from 300 of the " \
        "split's 1000 images" in proc.stderr  # fmt: skip
    x, y = mnist_subset("held_out")
    idx = spread(300, len(y))
    x, y = x[idx], y[idx]
    assert sorted(set(y.tolist())) == list(range(10))
    rows = {r["id"]: r for r in json.loads(proc.stdout)}
    share = {c: 100.0 * (y == c).float().mean().item() for c in range(10)}
    assert rows[0]["top1"] == pytest.approx(share[1])
    assert rows[0]["top5"] == pytest.approx(sum(share[c] for c in (1, 2, 3, 4, 5)))
    # Other stitches: the same numbers as a direct computation.
    pre = net.data_config()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (pre["mean"], pre["std"]))
    with torch.no_grad():
        for s in (1, 7):
            pred = net.eval()((x - mean) / std, s).argmax(-1)
            assert rows[s]["top1"] == pytest.approx(100.0 * (pred == y).float().mean().item())
    _, manifest = snnet_core.load(tmp_path)
    assert manifest.accuracy()[0] == pytest.approx(share[1], abs=0.01)
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_train_command_writes_a_servable_checkpoint(tmp_path):
    proc = snnet(
        "train", "--anchors", TINY_ANCHORS, "--overrides", json.dumps(TINY_OVERRIDES),
        "--data", "mnist", "--epochs", "1", "--batch-size", "100", "--lr", "1e-3",
        "--eval-split", "held_out", "--out", str(tmp_path), "--sampling", "flops",
    )  # fmt: skip
    assert "epoch 1/1" in proc.stderr  # progress bar
    # and what comes before it, said as it happens (seconds of silence for a real-size net)
    assert f"built the SN-Net of {TINY_ANCHORS}: {TINY_NUM_STITCHES} stitches" in proc.stderr
    assert "stitching layers least-squares initialised from" in proc.stderr
    net, manifest = snnet_core.load(tmp_path)
    assert manifest.training["config"]["sampling"] == "flops"
    evaluation = dict(manifest.evaluation)
    by_dtype = evaluation.pop("accuracy_by_dtype")
    assert evaluation == {"dataset": "mnist", "split": "held_out", "images": 1000}
    # float32's on record, as `snnet eval --write` records it: a later `snnet eval --dtype
    # bfloat16 --write` on the same split is all the server needs to weigh bfloat16
    assert by_dtype["float32"] == {str(s): a for s, a in manifest.accuracy().items()}
    assert len(manifest.accuracy()) == TINY_NUM_STITCHES
    # The state keeps the flags that built the net: a resume of another net names them
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert shlex.split(state["settings"]["net"]) == [
        "--anchors", TINY_ANCHORS, "--overrides", json.dumps(TINY_OVERRIDES), "--window", "2",
        "--stride", "1",
    ]  # fmt: skip
    # and it says what the training came to: each stitch's held-out accuracy
    table = proc.stdout.splitlines()
    assert table[0].split() == ["id", "description", "mflops", "accuracy", "top5"]  # as stitches
    assert len(table) == 1 + TINY_NUM_STITCHES
    assert float(table[1].split()[-2]) == manifest.stitches[0]["accuracy"]


def test_image_folder_data_matches_the_in_memory_digits(tmp_path):
    """An ImageNet-layout folder goes through the same preprocessing as everything else."""
    from PIL import Image

    from snnet_core.data import load_dataset
    from snnet_core.evaluate import evaluate

    x, y = mnist_subset("held_out")
    idx = list(range(0, 1000, 25))  # 40 digits, 4 per class
    for i in idx:
        d = tmp_path / "val" / f"class_{int(y[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").convert("RGB").save(
            d / f"{i}.png"
        )
    net = build_tiny(seed=6).eval()
    pre = {**net.data_config(), "crop_pct": 1.0}
    folder = load_dataset(str(tmp_path), "val", pre, training=False)
    assert folder.classes == [f"class_{c}" for c in range(10)]
    img, label = folder[0]
    assert img.shape == (1, 28, 28) and img.min() >= 0.0 and img.max() <= 1.0
    norm = (pre["mean"], pre["std"])
    from_folder = evaluate(net, folder, norm, stitch_ids=[0, 9])
    order = sorted(idx, key=lambda i: (int(y[i]), f"{i}.png"))  # ImageFolder's order
    in_memory = evaluate(net, DigitsDataset(x[order], y[order]), norm, stitch_ids=[0, 9])
    assert from_folder == in_memory


def test_training_eval_and_checkpoints_run_on_resnet_to_swin(tmp_path):
    """Nothing in training, evaluation or checkpoints is ViT-specific: the narrowed ResNet-18 ->
    Swin-T family (reference depths; a ResNet front, a Swin back, a conv-to-tokens stitching
    layer) trains, evaluates and reloads."""
    from snnet_core.evaluate import evaluate
    from tests.unit.test_families import build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; see tests/unit/test_families.py
    try:
        net = build("resnet_swin", seed=4)
        size = net.input_size[1:]
        x, y = mnist_subset("train")
        x = F.interpolate(x[::40][:100], size=size, mode="bilinear", align_corners=False)
        data = DigitsDataset(x, y[::40][:100])
        pre = net.data_config()
        norm = (pre["mean"], pre["std"])
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm)
        net.init_stitching_layers((x[:50] - mean) / std)
        cfg = TrainConfig(epochs=2, batch_size=25, lr=1e-3, warmup_epochs=0.5)
        gflops = [c.gflops for c in snnet_core.stitch_costs(net)]
        history = train(net, data, cfg, tmp_path, gflops=gflops, normalize=norm, progress=False)
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        res = evaluate(net, data, norm, batch_size=50)
        assert set(res) == set(range(len(net.stitches)))
        assert all(0 <= r["top1"] <= 100 for r in res.values())
        snnet_core.save(net.eval(), tmp_path / "ckpt")
        loaded, manifest = snnet_core.load(tmp_path / "ckpt")
        assert manifest.family == net.family
        with torch.no_grad():
            for s in range(len(net.stitches)):
                assert torch.equal(loaded(x[:2], s), net(x[:2], s))
    finally:
        torch.set_num_threads(threads)


def test_class_folders_are_the_labels_of_their_names_and_a_missing_split_is_an_error(tmp_path):
    """A folder of classes 1-9 was scored as labels 0-8 by sorted position (0% top-1, and
    fine-tuning learnt it); a split sub-folder that is not there fell back to the root, whose
    train/ and val/ became two classes. Both are now what the names say, or an error."""
    from PIL import Image

    from snnet_core.data import load_dataset

    x, y = mnist_subset("held_out")
    for i in range(0, 1000, 17):  # (the subset is sorted by class)
        if int(y[i]) != 0:  # classes 1-9 only
            d = tmp_path / "val" / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(
                d / f"{i}.png"
            )
    labels = [str(c) for c in range(10)]
    pre = {**build_tiny(seed=6).data_config(), "crop_pct": 1.0}
    folder = load_dataset(str(tmp_path), "val", pre, training=False, labels=labels)
    assert folder.classes == labels
    names = sorted({p.parent.name for p in (tmp_path / "val").rglob("*.png")})
    got = {folder.samples[k][0].split("/")[-2]: folder[k][1] for k in range(len(folder))}
    assert got == {n: int(n) for n in names}  # folder "3" is label 3, not its position 2
    with pytest.raises(ValueError, match=r"has no sub-folder 'held_out' \(it has: val\)"):
        load_dataset(str(tmp_path), "held_out", pre, training=False, labels=labels)
    (tmp_path / "val" / "cat").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "val" / "cat" / "a.png")
    with pytest.raises(ValueError, match=r"class folders \['cat'\] are not labels of the model"):
        load_dataset(str(tmp_path), "val", pre, training=False, labels=labels)


def test_fine_tuning_on_a_folder_of_some_classes_keeps_the_checkpoints_labels(tmp_path):
    """`snnet train --weights` on class folders named as some of the checkpoint's labels: each
    folder trains the label of its name (by position, folders 1-3 taught labels 0-2), and the
    checkpoint's labels stay; training into the folder it came from says it replaces it."""
    from PIL import Image

    snnet_core.save(build_tiny(seed=3), tmp_path / "ckpt")
    x, y = mnist_subset("train")
    for i in range(0, 2000, 7):
        if int(y[i]) in (1, 2, 3):
            d = tmp_path / "digits" / "train" / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(
                d / f"{i}.png"
            )
    ckpt = str(tmp_path / "ckpt")
    proc = snnet(
        "train", "--weights", ckpt, "--data", str(tmp_path / "digits"), "--out", ckpt,
        "--epochs", "1", "--batch-size", "50", "--lr", "1e-4", "--augment", "no-flip",
    )  # fmt: skip
    assert f"note: {ckpt} holds a checkpoint; this training replaces it" in proc.stderr
    assert f"loaded {ckpt}: {TINY_NUM_STITCHES} stitches" in proc.stderr
    _, manifest = snnet_core.load(ckpt)
    assert manifest.labels == [str(c) for c in range(10)]
    assert manifest.training["data"] == str(tmp_path / "digits")
    assert manifest.training["augment"] == "no-flip"  # (digits: never mirrored)


def test_an_eval_split_that_would_score_the_training_images_or_is_not_there_stops_before_training(
    tmp_path,
):
    """A folder of class folders (no train/ and val/) given --eval-split val was "evaluated" on
    the images it trained on, and the server ranked stitches by those figures; a misspelt split
    was found only after the whole training, with nothing saved. Both now stop before the first
    epoch; --resume with no train state says it starts afresh."""
    from PIL import Image

    snnet_core.save(build_tiny(seed=3), tmp_path / "ckpt")
    x, y = mnist_subset("train")
    for i in range(0, 400, 7):
        for root in ("flat", "split/train", "split/val"):
            d = tmp_path / root / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(
                d / f"{i}.png"
            )
    common = ["train", "--weights", str(tmp_path / "ckpt"), "--epochs", "1", "--batch-size", "50"]
    out = tmp_path / "out"
    proc = snnet(*common, "--data", str(tmp_path / "flat"), "--eval-split", "val",
                 "--out", str(out), check=False)  # fmt: skip
    assert proc.returncode != 0 and "so it would score the images it trains on" in proc.stderr
    assert "epoch" not in proc.stderr and not out.exists()  # before any training
    proc = snnet(*common, "--data", str(tmp_path / "split"), "--eval-split", "test",
                 "--out", str(out), check=False)  # fmt: skip
    assert proc.returncode != 0 and "has no sub-folder 'test' (it has: train, val)" in proc.stderr
    assert not out.exists()
    proc = snnet(*common, "--data", str(tmp_path / "split"), "--out", str(out), "--resume")
    assert f"note: --resume, but {out / 'train_state.pt'} is not there: starting afresh" in (
        proc.stderr
    )


def _digit_folders(root: Path, classes=(1, 2, 3), every: int = 13) -> None:
    """Real digits of ``classes`` as PNGs in one class folder each under ``root``."""
    from PIL import Image

    x, y = mnist_subset("train")
    for i in range(0, 2000, every):
        if int(y[i]) in classes:
            d = root / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(
                d / f"{i}.png"
            )


def _train_folder(*args: str, check: bool = True):
    """`snnet train` of the tiny family with a 3-class head on a folder of `_digit_folders`."""
    three = [{**o, "num_classes": 3} for o in TINY_OVERRIDES]
    return snnet(
        "train", "--anchors", TINY_ANCHORS, "--overrides", json.dumps(three),
        "--epochs", "1", "--batch-size", "20", "--augment", "none", "--ls-images", "20", *args,
        check=check,
    )  # fmt: skip


def test_an_unreadable_image_of_the_eval_split_keeps_the_trained_weights_and_says_what_next(
    tmp_path,
):
    """A corrupt file in the evaluation split made the evaluation after training fail with
    "OSError: Truncated File Read": no file named, and no checkpoint written (only the train
    state). Now the weights are saved first, and the error names the file and the command that
    records the accuracies once it is fixed. (A bad training image is skipped: test_data.)"""
    _digit_folders(tmp_path / "d" / "train")
    _digit_folders(tmp_path / "d" / "val", every=29)
    bad = tmp_path / "d" / "val" / "2" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    out = tmp_path / "out"
    proc = _train_folder("--data", str(tmp_path / "d"), "--eval-split", "val", "--out", str(out),
                         check=False)  # fmt: skip
    assert proc.returncode == 2
    assert f"error: {bad} cannot be read as an image" in proc.stderr
    assert f"the trained weights are saved in {out}, without accuracies" in proc.stderr
    assert f"snnet eval --weights {out} --data {tmp_path / 'd'} --split val --write" in proc.stderr
    net, manifest = snnet_core.load(out)  # a servable checkpoint
    assert manifest.labels == ["1", "2", "3"] and manifest.accuracy() == {}
    bad.unlink()  # fixed: the command it gave records them
    snnet("eval", "--weights", str(out), "--data", str(tmp_path / "d"), "--split", "val", "--write")
    assert len(snnet_core.load(out)[1].accuracy()) == TINY_NUM_STITCHES


def test_data_and_flags_that_cannot_make_the_net_asked_for_are_errors_before_training(tmp_path):
    """One class folder: the error advised num_classes 1, which trained a net that scored 100%
    everywhere. Flags that build a net from --anchors were ignored beside --weights (a
    checkpoint of 10 classes trained and saved as 10 with --overrides num_classes 5). A resume
    on folders of other classes relabelled them by sorted position."""
    _digit_folders(tmp_path / "one", classes=(3,))
    out = tmp_path / "out"
    proc = _train_folder("--data", str(tmp_path / "one"), "--out", str(out), check=False)
    assert proc.returncode == 2 and not out.exists()
    assert "holds one class folder (3): a classifier needs at least two classes" in proc.stderr
    snnet_core.save(build_tiny(seed=3), tmp_path / "ckpt")
    for flags in (["--overrides", '{"num_classes": 5}'], ["--window", "3"], ["--pretrained"]):
        proc = snnet("train", "--weights", str(tmp_path / "ckpt"), *flags, "--data", "mnist",
                     "--out", str(out), check=False)  # fmt: skip
        assert proc.returncode == 2 and not out.exists()
        assert f"error: {flags[0]} builds a new net from --anchors; --weights" in proc.stderr
    proc = snnet("stitches", "--weights", str(tmp_path / "ckpt"), "--stride", "2", check=False)
    assert proc.returncode == 2 and "--stride builds a new net from --anchors" in proc.stderr
    # a resume whose class folders are named otherwise
    _digit_folders(tmp_path / "three")
    _train_folder("--data", str(tmp_path / "three"), "--out", str(out))
    for d in (tmp_path / "three").iterdir():
        d.rename(d.with_name(f"digit {d.name}"))
    proc = _train_folder("--data", str(tmp_path / "three"), "--out", str(out), "--resume",
                         "--epochs", "2", check=False)  # fmt: skip
    assert proc.returncode == 2 and "epoch 2/2" not in proc.stderr
    assert "the run began with the classes 1, 2, 3, this data has digit 1, digit 2, digit 3" in (
        proc.stderr
    )


def test_eval_does_not_write_accuracy_on_the_training_split(tmp_path, monkeypatch):
    """`snnet eval --split train --write` replaced the held-out figures the server ranks
    stitches by with training ones, silently. The training folder is recorded as an absolute
    path: relative ones named different folders from different directories."""
    from PIL import Image

    _digit_folders(tmp_path / "a" / "d" / "fit")
    _digit_folders(tmp_path / "a" / "d" / "val", every=29)
    _digit_folders(tmp_path / "b" / "d" / "fit", every=31)  # another project's, held out here
    Image.new("L", (28, 28)).save(tmp_path / "a" / "d" / "val" / "1" / "scan.tif")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "a")
    proc = _train_folder("--data", "d", "--train-split", "fit", "--eval-split", "val",
                         "--out", str(out), "--lr", "5e-7")  # fmt: skip
    # (an --lr under the default end of the decay: the decay ends at it; the val split's TIFF
    # is left out, and said so)
    assert snnet_core.load(out)[1].training["config"]["min_lr"] == 5e-7
    assert f"note: {Path('d') / 'val'}: left out, as formats the server does not read: 1 .tif" \
        in proc.stderr  # fmt: skip
    before = (out / "manifest.json").read_text()
    for data, split in (("d", "fit"), ("d/fit", "fit"), (str(tmp_path / "a" / "d"), "fit"),
                        ("mnist", "train"), ("d", "training")):  # fmt: skip
        proc = snnet("eval", "--weights", str(out), "--data", data, "--split", split, "--write",
                     "--limit", "20", check=False)  # fmt: skip
        assert proc.returncode == 2, (data, split)
        assert f"--write: split '{split}' of {data} is training data" in proc.stderr
    assert (out / "manifest.json").read_text() == before
    proc = snnet("eval", "--weights", str(out), "--data", "d", "--split", "fit", "--limit", "20")
    assert "top1" in proc.stdout  # (without --write: the figures, shown)
    monkeypatch.chdir(tmp_path / "b")  # d/fit here is held-out data: written
    snnet("eval", "--weights", str(out), "--data", "d", "--split", "fit", "--write")
    assert snnet_core.load(out)[1].evaluation["dataset"] == "d"
