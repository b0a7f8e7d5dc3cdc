"""Run under torchrun by test_train.py: train the tiny family for one epoch, save this rank's weights."""

import os
import sys
from pathlib import Path

import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from snnet_core import stitch_costs  # noqa: E402
from snnet_core.data import DigitsDataset, mnist_subset  # noqa: E402
from snnet_core.train import TrainConfig, train  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402


def main(out: str) -> None:
    rank = int(os.environ["RANK"])  # train() joins and leaves the process group itself
    net = build_tiny(seed=0)
    x, y = mnist_subset("train")
    data = DigitsDataset(x[::10], y[::10], max_shift=2)  # 400 digits
    cfg = TrainConfig(epochs=1, batch_size=25, lr=1e-3, warmup_epochs=0.2)
    pre = net.data_config()
    train(
        net,
        data,
        cfg,
        out,
        gflops=[c.gflops for c in stitch_costs(net)],
        normalize=(pre["mean"], pre["std"]),
        progress=False,
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(state, f"{out}/rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
