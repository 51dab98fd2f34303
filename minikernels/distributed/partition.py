"""The zigzag partition of a causal sequence over P ranks, and the exchange that moves shards into it.

Cut the sequence into 2P equal chunks. The contiguous layout gives rank r chunks (2r, 2r + 1); under a
causal mask the last rank then has P times the work of the first. The zigzag layout gives rank r
chunks (r, 2P - 1 - r): one early and one late chunk, so that every rank sees the same number of
(query, key) pairs, and in the ring every step but the first costs each rank exactly half a full block
(``visible_block``).
"""

from __future__ import annotations

import torch

from ._group import exchange, wait


def contiguous_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two chunks (of 2 * world) that rank ``rank`` holds in the contiguous layout."""
    return 2 * rank, 2 * rank + 1


def zigzag_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two chunks (of 2 * world) that rank ``rank`` holds in the zigzag layout: one from each end."""
    return rank, 2 * world - 1 - rank


def holder(chunk: int, world: int, zigzag: bool) -> tuple[int, int]:
    """(rank, half) that holds ``chunk`` in the zigzag or the contiguous layout."""
    if not zigzag:
        return chunk // 2, chunk % 2
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def visible_block(rank: int, source: int, causal: bool, n: int) -> tuple[slice, slice, bool]:
    """What rank ``rank`` computes with the key/value shard of rank ``source`` (both shards of ``n``
    tokens, in the zigzag layout when ``causal``): (query rows, key rows, whether the block needs the
    causal mask). Without a mask every pair is visible. With it, for the halves of the two shards:

    * its own shard (source == rank): the causal mask on the whole block (the chunks are in order);
    * an earlier rank's (source < rank): both query halves see the early key half, neither the late one;
    * a later rank's (source > rank): only the late query half sees anything, and all of it.

    Each of the last two is n^2 / 2 pairs, the causal diagonal block n^2 / 2 + n / 2: balanced."""
    every = slice(None)
    if not causal or source == rank:
        return every, every, causal
    if source < rank:
        return every, slice(0, n // 2), False
    return slice(n // 2, None), every, False


def relayout(tensors: list[torch.Tensor], to_zigzag: bool, group, rank: int, world: int) -> list[torch.Tensor]:
    """Move each rank's shard of every tensor in ``tensors`` ([B, H_i, n, D_i], one dtype, n even) from the
    contiguous layout to the zigzag one (``to_zigzag``) or back. Each half-shard goes to its new holder in
    one message for all the tensors (packed), tagged with its chunk number; a half that stays is copied."""
    n = tensors[0].shape[2]
    halves = [[t[:, :, h * (n // 2):(h + 1) * (n // 2)] for t in tensors] for h in range(2)]
    mine = zigzag_chunks(rank, world) if not to_zigzag else contiguous_chunks(rank, world)
    wanted = zigzag_chunks(rank, world) if to_zigzag else contiguous_chunks(rank, world)

    def pack(parts):
        return torch.cat([p.reshape(-1) for p in parts])

    out = [[None, None] for _ in tensors]
    sends, recvs, landing = [], [], []
    for h, chunk in enumerate(mine):
        dest, slot = holder(chunk, world, zigzag=to_zigzag)
        if dest == rank:
            for i, p in enumerate(halves[h]):
                out[i][slot] = p
        else:
            sends.append((pack(halves[h]), dest, chunk))
    for slot, chunk in enumerate(wanted):
        source, _ = holder(chunk, world, zigzag=not to_zigzag)
        if source != rank:
            buffer = torch.empty(sum(p.numel() for p in halves[0]), dtype=tensors[0].dtype, device=tensors[0].device)
            recvs.append((buffer, source, chunk))
            landing.append((slot, buffer))
    wait(exchange(sends, recvs, group))
    for slot, buffer in landing:
        for i, piece in enumerate(buffer.split([p.numel() for p in halves[0]])):
            out[i][slot] = piece.view(halves[0][i].shape)
    return [torch.cat(parts, dim=2) for parts in out]


def causal_pairs(world: int, n: int, zigzag: bool) -> torch.Tensor:
    """[world, world] counts of visible (query, key) pairs under a causal mask: entry (r, s) is what rank
    r computes with rank s's keys, for shards of ``n`` tokens (n even) in either layout. Its row sums
    are each rank's work; the ring's time is set by the busiest rank at every step."""
    half = n // 2
    chunks = zigzag_chunks if zigzag else contiguous_chunks
    pairs = torch.zeros(world, world, dtype=torch.int64)
    for r in range(world):
        for s in range(world):
            for qc in chunks(r, world):
                for kc in chunks(s, world):
                    if kc < qc:
                        pairs[r, s] += half * half
                    elif kc == qc:
                        pairs[r, s] += half * (half + 1) // 2
    return pairs
