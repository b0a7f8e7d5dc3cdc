"""A start-up whose calibration runs while another process takes the cores: are the
predictions right once it is ready?

    python bench/disturbed_start.py [--during calibration|warm-up|profiling] [--hog-s 5]
                                    [--dir /tmp/snnet-deit] [--runs 5]

Serves the DeiT-Ti/S/B SN-Net (built by ``bench/deit_idle.py``) and starts two busy processes
for ``--hog-s`` seconds when the server logs that it is about to calibrate (the line on decoding
costs comes just before) or, with ``--during warm-up``, when the model process starts and warms
up (after the "loaded" line), or with ``--during profiling`` when profiling begins (it measures
the anchors first, then the rest for SNNET_PROFILE_SECONDS: the busy seconds slow some stitches'
measurements and not others). A start that measures its profile takes the calibration from
those measurements, so for ``--during calibration`` a first, undisturbed start fills a fresh
profile cache and the disturbed start is the second (a restart on a busy machine); with
``--during warm-up`` or ``profiling`` the one start has a fresh cache. Once ready, it
asks for each anchor, and for the three most accurate estimated stitches, ``--runs`` times by
``stitch_id`` and compares the compute time with the prediction (``GET /stitches``, batch 1).
Prints the server's calibration lines and ends with one JSON line: predicted / measured
compute per stitch, whether the anchors were timed again, and how many stitches profiling
measured again.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import SNNET, free_port  # noqa: E402
from deit_idle import photo_jpeg  # noqa: E402

HOG = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--during", choices=("calibration", "warm-up", "profiling"), default="calibration"
    )
    ap.add_argument("--hog-s", type=float, default=5.0)
    ap.add_argument("--dir", default="/tmp/snnet-deit")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not (Path(args.dir) / "manifest.json").is_file():
        raise SystemExit(f"no checkpoint in {args.dir}: run bench/deit_idle.py once to build it")
    env = {
        **os.environ, "SNNET_WEIGHTS": args.dir, "SNNET_GRPC_PORT": "0",
        "SNNET_PROFILE_CACHE": str(Path(tempfile.mkdtemp()) / "profiles.json"),
    }  # fmt: skip
    if args.during == "calibration":
        print("a first start fills the profile cache", flush=True)
        first = subprocess.Popen(
            [SNNET, "serve", "--port", str(free_port()), "--host", "127.0.0.1"],
            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        for line in first.stderr:
            if "ready in" in line or "Traceback" in line:
                print("   ", line.strip()[24:], flush=True)
                break
        first.terminate()
        first.wait(60)
    port = free_port()
    proc = subprocess.Popen(
        [SNNET, "serve", "--port", str(port), "--host", "127.0.0.1"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    hogs: list[subprocess.Popen] = []
    again, redone = False, 0
    try:
        for line in proc.stderr:
            cue = {
                "warm-up": "INFO snnet.engine: loaded ",
                "profiling": "latency profile for this device",
                "calibration": "decoding and pre",
            }[args.during]
            if cue in line and not hogs:
                code = HOG.format(s=args.hog_s)
                hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
                print(f"two busy processes for {args.hog_s:g} s from here", flush=True)
            keys = ("calibration", "ready in", "scaled by their warm-up", "timed again")
            if any(k in line for k in keys):
                print("   ", line.strip()[24:], flush=True)
                again |= "timing the anchors again" in line
                if m := re.search(r"(\d+) of \d+ stitches ran faster when timed again", line):
                    redone = int(m[1])
            if "ready in" in line:
                break
            if "Traceback" in line:
                raise SystemExit(f"server failed to start: {line}")
        else:
            raise SystemExit("server exited before it was ready")
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        for h in hogs:
            h.wait()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("GET", "/stitches")
        menu = json.loads(conn.getresponse().read())["stitches"]
        anchors = [s for s in menu if len(s["anchors"]) == 1]
        estimated = [s for s in menu if not s["measured"]]
        best = sorted(estimated, key=lambda s: -s["gflops"])[:3]
        image = base64.b64encode(photo_jpeg()).decode()
        ratios = {}
        for a in anchors + best:
            body = json.dumps({"image": image, "stitch_id": a["id"], "latency_budget_ms": 60000})
            ms = []
            for _ in range(args.runs):
                conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                answer = json.loads(r.read())
                if r.status != 200:
                    raise SystemExit(f"stitch {a['id']}: {r.status} {answer}")
                ms.append(answer["timing"]["compute_ms"])
            measured, predicted = statistics.median(ms), a["predicted_ms"]["1"]
            ratios[a["id"]] = round(predicted / measured, 2)
            what = "anchor" if len(a["anchors"]) == 1 else "estimated stitch"
            print(f"{what} {a['id']} ({a['description']}): predicted {predicted:.1f} ms, "
                  f"measured {measured:.1f} ms (median of {args.runs})")  # fmt: skip
        conn.close()
    finally:
        for h in hogs:
            h.kill()
        proc.terminate()
        proc.wait(60)
    print(
        json.dumps(
            {"timed_again": again, "measured_again": redone, "predicted_over_measured": ratios}
        )
    )


if __name__ == "__main__":
    main()
