"""A real-size SN-Net served as a new user would: time to ready, and budgets met at idle with
photo-sized JPEGs.

    python bench/deit_idle.py [--requests 60] [--dir /tmp/snnet-deit] [--budget-scale 1.3]
                              [--think-s 0] [--anchors deit_tiny_patch16_224,...]

Builds the DeiT-Ti/S/B SN-Net (71 stitches; random weights: ``pretrained=False``, no network;
the checkpoint has no accuracies, so stitches rank by GFLOPs) once into ``--dir``; ``--anchors``
builds another family instead (Swin-T/S/B: ``--anchors swin`` and its own ``--dir``, default
``/tmp/snnet-<first anchor's family>``), starts
`snnet serve` on it with the default settings and a fresh profile cache, and reports how long
after the weights were loaded `/readyz` answered. Then one client sends single-image requests
one after another, a 500x375 JPEG base64-encoded in JSON, with budgets spread over the stitches'
predicted range (``--budget-scale`` x the fastest to ``--budget-scale`` x the slowest stitch's
batch-1 time, cycling), and the script prints the share within budget as the server and as the
client measured it, and how server time compared with the planner's prediction. With
``--think-s``, the client waits that long between requests, as a person at the page or any
sparse client does: the server is idle in between. Also counts the answers marked best effort
(budgets below what the server promises, served by the fastest stitch). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start_server  # noqa: E402

DEIT = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"
FAMILIES = {  # short names for --anchors
    "deit": DEIT,
    "swin": "swin_tiny_patch4_window7_224,swin_small_patch4_window7_224,"
    "swin_base_patch4_window7_224",
    "resnet": "resnet18,resnet50",
}


def photo_jpeg() -> bytes:
    """A 500x375 photo-like JPEG (smooth colour fields and noise), about 100 KB."""
    gen = np.random.default_rng(1)
    yy, xx = np.mgrid[0:375, 0:500]
    img = np.stack([xx * 255 // 500, yy * 255 // 375, (xx + yy) * 255 // 875], -1)
    img = np.clip(img + gen.normal(0, 24, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument(
        "--anchors", default="deit", help=f"timm names, or one of {', '.join(FAMILIES)}"
    )
    ap.add_argument("--dir", help="the checkpoint (default /tmp/snnet-<family>)")
    ap.add_argument("--budget-scale", type=float, default=1.3)
    ap.add_argument("--think-s", type=float, default=0.0, help="idle time between requests")
    ap.add_argument(
        "--rows",
        help="write the menu, then every request's figures or its refusal (JSON lines) here",
    )
    args = ap.parse_args()
    anchors = FAMILIES.get(args.anchors, args.anchors)
    family = (
        args.anchors if args.anchors in FAMILIES else anchors.split("_")[0].rstrip("0123456789")
    )
    ckpt = Path(args.dir or f"/tmp/snnet-{family}")
    if (ckpt / "manifest.json").is_file():
        config = json.loads((ckpt / "manifest.json").read_text())["config"]
        built = ",".join(a["name"] for a in config["anchors"])
        if built != anchors:
            sys.exit(f"{ckpt} holds {built}, not {anchors}: give another --dir")
    else:
        import torch

        import snnet_core

        torch.manual_seed(0)
        print(f"building {anchors} (random weights) into {ckpt} ...", file=sys.stderr)
        snnet_core.save(snnet_core.build_snnet(anchors).eval(), ckpt)
    t0 = time.monotonic()
    log: list[str] = []
    proc, url = start_server({"SNNET_WEIGHTS": str(ckpt)}, log=log)
    ready_s = time.monotonic() - t0
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    try:
        conn.request("GET", "/stitches")
        menu = json.loads(conn.getresponse().read())["stitches"]
        estimated = sum(1 for s in menu if not s["measured"])
        ms = [s["predicted_ms"]["1"] for s in menu]
        lo, hi = args.budget_scale * min(ms), args.budget_scale * max(ms)
        budgets = [lo * (hi / lo) ** (k / 9) for k in range(10)]
        body_img = base64.b64encode(photo_jpeg()).decode()
        if args.rows:  # first, the menu as served: what bench/law_replay.py starts from
            with open(args.rows, "a") as f:
                keep = ("id", "measured", "gflops", "latency_ms", "predicted_ms")
                f.write(json.dumps({"menu": [{k: s[k] for k in keep} for s in menu]}) + "\n")
        rows, others = [], []
        for i in range(args.requests):
            if args.think_s and i:
                time.sleep(args.think_s)  # the client's think time: the server idles
            budget = round(budgets[i % len(budgets)], 1)
            body = json.dumps({"image": body_img, "latency_budget_ms": budget})
            t1 = time.perf_counter()
            conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            answer = json.loads(r.read())
            rtt = (time.perf_counter() - t1) * 1e3
            if r.status != 200:
                rows.append((budget, r.status, rtt, None, None, None))
                if args.rows:
                    with open(args.rows, "a") as f:
                        row = {"i": i, "budget": budget, "status": r.status, "detail": answer}
                        f.write(json.dumps(row) + "\n")
                if r.status != 422:
                    others.append(f"#{i} budget {budget} ms: {r.status} {answer}")
                continue
            t = answer["timing"]
            best_effort = bool(answer.get("best_effort"))  # (older servers: none)
            rows.append(
                (budget, 200, rtt, t["total_ms"], t["predicted_ms"], answer["stitch"]["id"],
                 best_effort)
            )  # fmt: skip
            if args.rows:
                with open(args.rows, "a") as f:
                    row = {"i": i, "budget": budget, "rtt": rtt, **t, "stitch": rows[-1][5],
                           "best_effort": best_effort}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
        conn.request("GET", "/controller")
        state = json.loads(conn.getresponse().read())
    finally:
        conn.close()
        proc.terminate()
        proc.wait(60)
    ok = [r for r in rows if r[1] == 200]
    refused = [r for r in rows if r[1] == 422]
    tried = [r for r in ok if r[6]]  # best effort: budgets below the promise
    share = lambda i: sum(1 for r in ok if r[i] <= r[0]) / len(ok) if ok else None  # noqa: E731
    server, client = share(3), share(2)  # (None: a short run with every budget refused)
    over = sorted(r[3] - r[4] for r in ok)
    mid = round(statistics.median(over), 2) if ok else None
    top = round(max(over), 2) if ok else None
    print(f"# {anchors}, {len(menu)} stitches, defaults; {ckpt}")
    print(f"ready {ready_s:.1f} s after start ({estimated} stitches estimated); the server's log:")
    for line in log:
        print("   ", line.rstrip()[24:])  # without the date
    print(f"budgets {lo:.0f}..{hi:.0f} ms, {len(rows)} sequential single-JPEG JSON requests: "
          f"{len(ok)} answered, {len(refused)} refused as below what the request needs (422: "
          f"budgets up to {max((r[0] for r in refused), default=0):g} ms)")  # fmt: skip
    if others:
        print(f"{len(others)} refused otherwise:")
        for line in others:
            print("   ", line)
    if ok:
        print(f"answered within budget: server {server:.1%}, client {client:.1%}")
        print(f"server total - predicted: median {mid:.1f} ms, max {top:.1f} ms; stitches used "
              f"{len({r[5] for r in ok})}; device factor {state['device_factor']}")  # fmt: skip
        print(
            f"best effort (budgets below the promise, the fastest stitch): {len(tried)}, "
            f"{sum(r[2] <= r[0] for r in tried)} within budget as the client measured"
        )
    print(json.dumps({"ready_s": round(ready_s, 1), "estimated": estimated, "refused": len(refused),
                      "refused_otherwise": len(others), "best_effort": len(tried),
                      "best_effort_within": sum(r[2] <= r[0] for r in tried),
                      "server_within": server and round(server, 4),
                      "client_within": client and round(client, 4),
                      "over_median_ms": mid, "over_max_ms": top,
                      "think_s": args.think_s}))  # fmt: skip


if __name__ == "__main__":
    main()
