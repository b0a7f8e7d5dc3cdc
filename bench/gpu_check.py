"""The GPU check, in one run (``bench/gpu_check.sh`` calls it): a real-size SN-Net served on CUDA,
every stitch checked against the CPU in float32, and the load benchmark.

    python bench/gpu_check.py [--dir /tmp/snnet-deit] [--skip-load]

1. Builds the DeiT-Ti/S/B SN-Net (71 stitches, random weights: ``pretrained=False``, no network)
   into ``--dir`` unless it is there.
2. Starts `snnet serve` on it with ``SNNET_DEVICE=cuda`` and the other settings at their
   defaults (dtype and profile by measurement), and reports how long ``/readyz`` took.
3. Sends one 500x375 JPEG to every stitch (``stitch_id``, ``top_k=5``) and compares the scores
   the server returned with the CPU's float32 softmax of the same preprocessed image: the
   largest difference per stitch, and whether top-1 agrees. (Random weights give nearly flat
   1000-way softmaxes, so top-1 is reported, not required; the scores must agree within
   ``--tol`` in float32, 10x that in a 16-bit dtype.)
4. Runs ``bench/load.py --quick`` against the same checkpoint on CUDA.

``--device cpu`` runs the same steps on the CPU (a dry run of the script itself).

Prints a summary and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start_server  # noqa: E402
from deit_idle import DEIT, photo_jpeg  # noqa: E402

HERE = Path(__file__).resolve().parent


def cpu_probabilities(ckpt: Path, jpeg: bytes) -> tuple[list, dict]:
    """float32 softmax of every stitch on the CPU for ``jpeg``, preprocessed as the server does."""
    import torch

    import snnet_core
    from server.imaging import decode_image, make_transform

    net, manifest = snnet_core.load(ckpt)
    net = net.eval()
    x = make_transform(manifest.preprocessing)(
        decode_image(jpeg, max_bytes=len(jpeg), max_pixels=10**8)
    )[None]
    with torch.inference_mode():
        return [torch.softmax(net(x, s), -1)[0] for s in range(len(net.stitches))], manifest.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/snnet-deit")
    ap.add_argument("--tol", type=float, default=2e-3, help="score tolerance in float32")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu runs the same checks (a dry run)")
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this check needs one (--device cpu: a dry run)")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    ckpt = Path(args.dir)
    if not (ckpt / "manifest.json").is_file():
        import snnet_core

        torch.manual_seed(0)
        print(f"building {DEIT} (random weights) into {ckpt} ...", file=sys.stderr)
        snnet_core.save(snnet_core.build_snnet(DEIT).eval(), ckpt)
    jpeg = photo_jpeg()
    t0 = time.monotonic()
    cpu, labels = cpu_probabilities(ckpt, jpeg)
    print(f"CPU float32 reference for {len(cpu)} stitches: {time.monotonic() - t0:.1f} s")

    t0 = time.monotonic()
    log: list[str] = []
    proc, url = start_server({"SNNET_WEIGHTS": str(ckpt), "SNNET_DEVICE": args.device}, log=log)
    ready_s = time.monotonic() - t0
    decisions = [ln.strip() for ln in log if "dtype:" in ln or "calibration" in ln]
    print(f"{gpu}: ready {ready_s:.1f} s after start")
    for line in decisions:
        print("   ", line[-200:])
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    worst, top1, rows = 0.0, 0, []
    try:
        conn.request("GET", "/stitches")
        served = json.loads(conn.getresponse().read())
        dtype = served["dtype"]
        tol = args.tol if dtype == "float32" else 10 * args.tol
        body = {"image": base64.b64encode(jpeg).decode(), "top_k": 5, "latency_budget_ms": 10_000}
        for s in range(len(cpu)):
            conn.request("POST", "/classify", json.dumps({**body, "stitch_id": s}),
                         {"Content-Type": "application/json"})  # fmt: skip
            r = conn.getresponse()
            answer = json.loads(r.read())
            if r.status != 200:
                raise SystemExit(f"stitch {s}: HTTP {r.status} {answer}")
            preds = answer["predictions"][0]
            diff = max(abs(p["score"] - float(cpu[s][p["class_index"]])) for p in preds)
            worst = max(worst, diff)
            top1 += int(preds[0]["class_index"] == int(cpu[s].argmax()))
            rows.append((s, diff, answer["timing"]["compute_ms"]))
    finally:
        conn.close()
        proc.terminate()
        proc.wait(timeout=60)
    bad = [s for s, d, _ in rows if d > tol]
    print(f"every stitch vs the CPU ({dtype} on {args.device}): largest score difference {worst:.2e} "
          f"(tolerance {tol:.0e}); top-1 agrees on {top1}/{len(cpu)}; over tolerance: {bad}")  # fmt: skip
    print("compute ms at batch 1, cheapest and dearest stitch:",
          min(c for *_, c in rows), max(c for *_, c in rows))  # fmt: skip

    load = None
    if not args.skip_load:
        out = HERE / "results" / "gpu_load"
        cmd = [sys.executable, str(HERE / "load.py"), "--quick", "--weights", str(ckpt),
               "--out", str(out)]  # fmt: skip
        done = subprocess.run(
            cmd, env={**os.environ, "SNNET_DEVICE": args.device}, capture_output=True, text=True
        )
        print(done.stdout[-3000:])
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
        lines = done.stdout.strip().splitlines()
        load = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    print(json.dumps({"gpu": gpu, "ready_s": round(ready_s, 1), "dtype": dtype,
                      "stitches": len(cpu), "max_score_diff": worst, "within_tol": not bad,
                      "top1_agree": top1, "load": load}))  # fmt: skip
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
