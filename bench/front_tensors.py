"""How a front's tensor reaches the model owner (``SNNET_API_WORKERS`` > 1), side by side in one
run: by shared memory (what the fronts do: the front copies it into its arena, the message
carries an offset, the owner reads the pages in place) and by socket (the fallback: the tensor's
bytes in the message's pickle, read and copied by the owner).

    python bench/front_tensors.py [--size 224] [--n 300]

One process plays both ends over a real Unix socket pair with the channel's own framing, so the
figure is the CPU time of both sides per request of one image (a real front and owner split it
between two processes; the socket path's share at the owner is its read, unpickling and copy).
Ends with one JSON line: ``{"socket_us", "shared_memory_us", "ratio"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.fronts import Arena, _frame, _map_arena, _read  # noqa: E402


async def measure(size: int, n: int) -> dict[str, float]:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    a, b = socket.socketpair(socket.AF_UNIX)
    owner_reader, owner_writer = await asyncio.open_unix_connection(sock=a)
    front_reader, front_writer = await asyncio.open_unix_connection(sock=b)
    arena = Arena.create(size=8 << 20)
    if arena is None:
        raise SystemExit("no /dev/shm here: nothing to compare")
    mapped = _map_arena(arena.path, arena.size)
    times: dict[str, list[float]] = {"socket": [], "shared_memory": []}
    for rnd in range(6):  # alternating rounds; the first of each is not counted
        for via in times:
            for i in range(n // 5):
                t0 = time.perf_counter()
                if via == "socket":
                    data = x.contiguous().numpy().tobytes()
                    front_writer.write(_frame(("run", i, tuple(x.shape), data)))
                    msg = await _read(owner_reader)
                    y = np.frombuffer(bytearray(msg[3]), dtype=np.float32).reshape(msg[2])
                    y = torch.from_numpy(y)
                else:
                    offset = arena.put(x)
                    front_writer.write(_frame(("run", i, tuple(x.shape), offset)))
                    msg = await _read(owner_reader)
                    count = math.prod(msg[2])
                    y = torch.frombuffer(mapped, dtype=torch.float32, count=count, offset=msg[3])
                    y = y.view(msg[2])
                    arena.free(offset)
                if rnd:
                    times[via].append((time.perf_counter() - t0) * 1e6)
                assert torch.equal(y, x)
    for w in (owner_writer, front_writer):
        w.close()
    arena.close()
    return {via: statistics.median(t) for via, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224, help="image side (3 channels, float32)")
    ap.add_argument("--n", type=int, default=300, help="requests per path")
    args = ap.parse_args()
    med = asyncio.run(measure(args.size, args.n))
    mb = 3 * args.size * args.size * 4 / 1e6
    print(f"# one 3x{args.size}x{args.size} float32 image ({mb:.2f} MB) front -> owner, "
          f"{args.n} per path in alternating rounds, both ends' CPU")  # fmt: skip
    print(f"by socket (bytes in the message)     median {med['socket']:8.1f} us")
    print(f"by shared memory (offset in arena)   median {med['shared_memory']:8.1f} us")
    ratio = med["socket"] / med["shared_memory"]
    print(f"ratio socket / shared memory         {ratio:8.2f}")
    print(json.dumps({"socket_us": round(med["socket"], 1),
                      "shared_memory_us": round(med["shared_memory"], 1),
                      "ratio": round(ratio, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
