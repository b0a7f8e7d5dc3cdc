"""Clients that give up: what their abandoned requests cost everyone else.

    python bench/abandon.py [--seconds 20] [--patient 2] [--impatient 4] [--weights DIR]
                            [--api-workers N]

Two kinds of client share one `snnet serve`, each a closed loop on its own connection:

- **patient** ones send single digits with a budget of ``--budget`` times the most accurate
  stitch's profiled batch-1 time and wait for every answer;
- **impatient** ones send 8 digits pinned to the most accurate stitch with a budget of 10 s (the
  server admits them) but give up after ``--timeout`` times that stitch's batch-8 time: they
  close the connection, as a client whose own timeout is shorter than its budget does, and send
  the next one on a new connection.

Run it on two versions of the server side by side (``PYTHONPATH=<worktree> python
bench/abandon.py``): a server that runs what nobody waits for any more spends the model on it,
and the patient clients see it as load (503s, cheaper stitches). Prints the patient clients'
answered rate, share within budget, share refused and mean accuracy of the stitches that
answered them, and the images the server ran against those it withdrew; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402


def metric(url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--patient", type=int, default=2)
    ap.add_argument("--impatient", type=int, default=4)
    ap.add_argument("--budget", type=float, default=8.0, help="x the best stitch at batch 1")
    ap.add_argument("--timeout", type=float, default=2.5, help="x the best stitch at batch 8")
    ap.add_argument("--weights", help="checkpoint to serve (default: the bundled weights/)")
    ap.add_argument("--api-workers", type=int, default=1, help="SNNET_API_WORKERS")
    args = ap.parse_args()
    env = {"SNNET_API_WORKERS": str(args.api_workers)}
    if args.weights:
        env["SNNET_WEIGHTS"] = args.weights
    proc, url = start_server(env)
    c = Client(url)
    menu = c.get("/stitches")["stitches"]
    c.close()
    best = max(menu, key=lambda r: (r["accuracy"] or 0, -r["gflops"]))
    accuracy = {r["id"]: r["accuracy"] for r in menu}
    budget = round(args.budget * best["predicted_ms"]["1"], 2)
    give_up_s = args.timeout * best["predicted_ms"]["8"] / 1e3
    pngs = digit_pngs()
    patient: list[tuple[float, int, int | None, bool]] = []  # rtt ms, status, stitch, server met
    impatient = collections.Counter()
    lock = threading.Lock()
    gc.collect()
    gc.freeze()
    host, port = url.removeprefix("http://").split(":")
    ran0 = metric(url, "snnet_batch_size_sum")
    gone0 = metric(url, "snnet_withdrawn_images_total")
    stop_at = time.monotonic() + args.seconds

    def patient_client(k: int) -> None:
        cl = Client(url)
        i = k
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            status, body = cl.classify(pngs[i % len(pngs)], latency_budget_ms=budget)
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                ok = status == 200
                patient.append(
                    (ms, status, body["stitch"]["id"] if ok else None, ok and body["budget_met"])
                )
            i += 1

    def impatient_client(k: int) -> None:
        while time.monotonic() < stop_at:
            cl = Client(url)
            cl.conn.connect()
            cl.conn.sock.settimeout(give_up_s)
            try:
                status, _ = cl.classify(
                    pngs[k * 8 : k * 8 + 8], stitch_id=best["id"], latency_budget_ms=10_000
                )
                outcome = str(status)
            except TimeoutError:
                outcome = "gave up"
            cl.close()
            with lock:
                impatient[outcome] += 1

    try:
        threads = [threading.Thread(target=patient_client, args=(k,)) for k in range(args.patient)]
        threads += [
            threading.Thread(target=impatient_client, args=(k,)) for k in range(args.impatient)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        settle = time.monotonic() + 10  # (what was queued when the clients stopped runs or leaves)
        while metric(url, "snnet_queue_depth") > 0 and time.monotonic() < settle:
            pass
        time.sleep(2 * best["predicted_ms"]["8"] / 1e3)  # (and the batch running then, counted)
        ran = metric(url, "snnet_batch_size_sum") - ran0
        withdrawn = metric(url, "snnet_withdrawn_images_total") - gone0
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in patient if r[1] == 200]
    within = sum(r[0] <= budget for r in ok) / max(1, len(ok))
    met = sum(r[3] for r in ok) / max(1, len(ok))
    refused = 1 - len(ok) / max(1, len(patient))
    acc = statistics.fmean(accuracy[r[2]] for r in ok) if ok else 0.0
    print(
        f"# {args.patient} patient clients (1 digit, budget {budget:g} ms), {args.impatient} "
        f"impatient ones (8 digits on stitch {best['id']}, giving up after "
        f"{give_up_s * 1e3:.1f} ms), {args.seconds:g} s, SNNET_API_WORKERS={args.api_workers}"
    )
    print(
        f"patient: {len(ok) / elapsed:.1f} answered/s, {100 * within:.2f}% within budget "
        f"({100 * met:.2f}% by the server's clock: this client's threads share one GIL), "
        f"{100 * refused:.1f}% refused ({dict(collections.Counter(r[1] for r in patient))}), "
        f"mean accuracy of the answering stitches {acc:.2f}% (best {best['accuracy']:.2f}%)"
    )
    print(
        f"impatient: {dict(impatient)}; the server ran {ran:.0f} images and withdrew "
        f"{withdrawn:.0f} unrun"
    )
    print(
        json.dumps(
            {
                "patient_rps": round(len(ok) / elapsed, 1),
                "patient_within": round(within, 4),
                "patient_server_within": round(met, 4),
                "patient_refused": round(refused, 4),
                "patient_accuracy": round(acc, 2),
                "impatient_gave_up": impatient["gave up"],
                "impatient_answered": impatient["200"],
                "images_run": int(ran),
                "images_withdrawn": int(withdrawn),
            }
        )
    )


if __name__ == "__main__":
    main()
