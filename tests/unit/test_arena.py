"""The fronts' shared-memory arena (server/fronts.py): where a front puts a request's tensor for
the model owner to read in place. A real file, mapped twice as the two processes map it."""

import mmap
import os

import torch

from server.fronts import Arena, _map_arena


def test_a_tensor_put_in_the_arena_is_read_in_place_by_the_owner_and_its_space_reused(tmp_path):
    arena = Arena.create(size=1 << 20, directory=str(tmp_path))
    assert arena is not None and os.path.getsize(arena.path) == 1 << 20
    owner = _map_arena(arena.path, arena.size)  # as the owner does: map, then unlink
    assert owner is not None and not os.path.exists(arena.path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    offset = arena.put(x)
    seen = torch.frombuffer(owner, dtype=torch.float32, count=x.numel(), offset=offset)
    assert torch.equal(seen.view(x.shape), x)  # the same pages, no copy on the owner's side
    second = arena.put(x)
    assert second >= offset + x.numel() * 4  # in use: not handed out twice
    arena.free(offset)
    arena.free(second)
    assert arena.used == 0 and arena._free == [[0, 1 << 20]]  # merged back into one block
    assert arena.put(x) == 0  # and reused


def test_freed_blocks_merge_with_both_neighbours_and_a_full_arena_says_so(tmp_path):
    arena = Arena.create(size=4096, directory=str(tmp_path))
    a, b, c = (arena.alloc(1000) for _ in range(3))  # 1024 bytes each, aligned
    assert (a, b, c) == (0, 1024, 2048)
    assert arena.alloc(2000) is None  # 1024 left: no room (the tensor then goes by socket)
    arena.free(a)
    arena.free(c)
    assert arena._free == [[0, 1024], [2048, 2048]]
    arena.free(b)
    assert arena._free == [[0, 4096]]
    assert arena.put(torch.zeros(2048)) is None  # 8 KB into 4 KB


def test_no_arena_where_there_is_no_room_or_no_directory(tmp_path):
    assert Arena.create(directory=str(tmp_path / "missing")) is None
    assert Arena.create(size=1 << 60, directory=str(tmp_path)) is None  # posix_fallocate fails
    assert list(tmp_path.iterdir()) == []  # and leaves no file behind
    assert _map_arena(str(tmp_path / "not-an-arena"), 4096) is None  # only snnet-front-* files
    assert isinstance(Arena.create(size=4096, directory=str(tmp_path)).mm, mmap.mmap)
