"""The peer `bench/peer.py` compares against: what a user writes without SN-Net. FastAPI on the
same uvicorn, one timm model (the checkpoint's most accurate anchor), a sync route (FastAPI runs
it in its thread pool), PIL decode and timm's own evaluation transform; nothing of snnet-serve's
on the request path (the checkpoint is only read at start-up). Its answer's ``timing.compute_ms``
is the forward alone, for `bench/server_overhead.py`'s "plain" overhead.

    python bench/_plain.py CHECKPOINT_DIR PORT
"""

import io
import sys
import time
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from timm.data import create_transform

import snnet_core


def build(ckpt: str) -> FastAPI:
    net, manifest = snnet_core.load(ckpt)
    rows = [r for r in manifest.stitches if len(r["anchors"]) == 1]
    best = max(rows, key=lambda r: (r["accuracy"] or 0, r["gflops"]))
    model = net.anchors[net.stitch(best["id"]).anchors[0]].eval()
    pre = manifest.preprocessing
    c, h, w = pre["input_size"]
    tf = create_transform(
        input_size=(3, h, w), is_training=False, interpolation=pre.get("interpolation", "bicubic"),
        crop_pct=pre.get("crop_pct", 0.875), crop_mode=pre.get("crop_mode", "center"),
        mean=tuple(pre["mean"]), std=tuple(pre["std"]),
    )  # fmt: skip
    mode = "L" if c == 1 else "RGB"
    app = FastAPI()

    @app.post("/classify")
    def classify(image: Annotated[UploadFile, File()]) -> dict:
        x = tf(Image.open(io.BytesIO(image.file.read())).convert(mode))[None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(x)
        compute_ms = (time.perf_counter() - t0) * 1e3
        p = torch.softmax(logits, -1)[0]
        k = int(p.argmax())
        return {"class_index": k, "label": manifest.labels[k], "score": float(p[k]),
                "timing": {"compute_ms": compute_ms}}  # fmt: skip

    @app.get("/healthz")
    def healthz() -> dict:
        return {"model": best["description"], "accuracy": best["accuracy"]}

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
