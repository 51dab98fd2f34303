"""Chapter 6: attention across devices, on ``torch.distributed``.

``ring_attention`` keeps each rank's query shard and passes key/value shards around a ring of
point-to-point transfers, merging partial results with chapter 1's (m, l, o) rule; ``ulysses_attention``
trades sequence shards for head groups with two all-to-alls. Both take each rank's contiguous shard
``[B, H, N/P, D]`` and return that rank's output shard, equal to ``mk.flash_attention`` on the
gathered sequence. Importing this module starts no process group.
"""

from .partition import causal_pairs, contiguous_chunks, visible_block, zigzag_chunks
from .ring import merge, ring_attention
from .timeline import record_timeline
from .ulysses import ulysses_attention

__all__ = ["causal_pairs", "contiguous_chunks", "merge", "record_timeline", "ring_attention", "ulysses_attention",
           "visible_block", "zigzag_chunks"]
