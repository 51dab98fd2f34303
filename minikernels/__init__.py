"""minikernels: small, verified Triton kernels for efficient attention.

Import this package before triton: on a machine without a CUDA GPU it selects Triton's interpreter
(``TRITON_INTERPRET=1``), so the same code runs on a laptop CPU. ``backend()`` says which is live.
"""

from . import _backend  # noqa: F401, I001  (must run before triton is imported anywhere below)
from ._backend import backend, device
from . import masks, reference, testing
from . import kv_cache
from . import kv_compression
from . import distributed
from .block_sparse import block_sparse_attention
from .decode import decode_attention
from .flash import flash_attention
from .varlen import flash_attention_varlen
from .linear import linear_attention
from .row_softmax import softmax
from .scan import selective_scan
from .duality import ssd

__all__ = ["backend", "block_sparse_attention", "decode_attention", "device", "distributed", "flash_attention",
           "flash_attention_varlen", "kv_cache", "kv_compression",
           "linear_attention", "masks", "reference", "selective_scan", "softmax",
           "ssd", "testing"]
__version__ = "0.1.0"
