"""Chapter 3: causal linear attention with an optional per-step decay.

    S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T        (state [Dk, Dv], one per batch and head)
    o_t = phi(q_t)^T S_t                            (no scale factor is applied)

with, when ``normalize`` is set, o_t divided by phi(q_t)^T z_t, z_t = exp(g_t) z_{t-1} + phi(k_t).
``g`` is a log-decay (<= 0; None means no decay).

This module holds what the chapter derives, in PyTorch: the feature maps (defined, with the input
checks, in ``minikernels.feature_maps``, which the Triton-free oracle imports too; exported here as
well), and the *parallel* (masked, quadratic) and *chunked* (intra-chunk quadratic, inter-chunk
recurrent, as in Lightning Attention-2) forms of the recurrence that ``mk.reference.linear_attention``
runs step by step; and ``linear_attention``, the chunked form in Triton (forward and backward).

The kernels follow the chunked form in two passes, as flash-linear-attention does: a short
sequential pass finds the state each chunk starts from, then every chunk is computed at once.
Per chunk c of C steps (b_t = the log-decays summed from the chunk's start, inclusive; b_C the
chunk's total; M[t, s] = exp(b_t - b_s) for s <= t, else 0; S_c the state entering chunk c; dS_c
the gradient of the state leaving it):

    _la_states  (sequential):  S_{c+1} = exp(b_C) S_c + (K * exp(b_C - b))^T V, S_c stored
                               (in segments chained by _la_carry when it has few programs)
    _la_out     (parallel):    O_c  = (Q K^T * M) V + exp(b) Q S_c
    _la_dstates (sequential, in reverse):  dS_{c-1} = exp(b_C) dS_c + (Q * exp(b))^T dO, dS_c stored
                               (in segments chained by _la_carry when it has few programs)
    _la_dv      (parallel):    dV_c = (Q K^T * M)^T dO + exp(b_C - b) K dS_c
    _la_dqdk    (parallel, two launches):  dQ_c = (dO V^T * M) K + exp(b) dO S_c^T
                                           dK_c = (dO V^T * M)^T Q + exp(b_C - b) V dS_c^T

With per-step value weights w (how mk.ssd passes its step sizes), the values are w_t v_t: the
forward folds w into the factor exp(b_C - b) of the state update and into the columns of
Q K^T * M; the backward weights V's rows as it loads them, and _la_dv turns the gradient of w_t v_t
into those of v_t and w_t. With a rate a_h besides (mk.ssd's A), the log-decay is g_t = w_t a_h,
and _la_rate_grads folds g's gradient into w's and a's. Q and K may have one head that every head
reads (mk.ssd's C and B): _la_dqdk then takes several heads a program, loads its Q and K once, and
sums their gradients over the heads. The weighted forward (when Dk <= 128 and its tiles fit in
shared memory) needs no stored states: _la_fused walks the chunks once with the state in registers
and writes O_c as it goes, the sequence cut into segments
whose starting states come from a walk that stores nothing but each segment's end (_la_states) and
_la_carry. Its backward can do the same in reverse: _la_dfused walks the chunks from the last with
dS in registers and writes dV_c as it goes (_la_dstates and _la_dv in one pass), in segments chained
the same way (_la_dstates storing only each segment's part, then _la_carry); it is taken where the
separate reverse pass would be cut into segments too (few programs), and measured slower elsewhere.

The states cost B*H*(N/C)*Dk*Dv values of memory, and buy parallelism over chunks: the sequential
passes do one small product per chunk, the rest runs on every chunk at once. When a gradient will
be needed, the forward keeps them for the backward (the one walk then writes them too), rather than
the backward walking the sequence again to recompute them.

The decay's gradient comes from the same identity inside each chunk: o depends on b through
q~ = e^b q and k~ = e^-b k, and on b_C through S_{c+1}, so dL/db_t = q_t . dq_t - k_t . dk_t plus
<dS_c, S_{c+1}> for b_C; dL/dg_t is the sum of these from t to the chunk's end. (Summed over the
whole sequence instead, the rounding errors of q.dq - k.dk pile up with its length.)
"""

from ..feature_maps import FEATURE_MAPS, apply_feature_map, mapped_features, taylor_features
from . import autograd, backward, common, forms, forward, plan, states
from .autograd import (
    CHUNK_SIZES,
    MAX_FEATURE_DIM,
    LinearAttentionFunction,
    apply_in_batch_slices,
    check_chunk_size,
    linear_attention,
)
from .forms import chunked_form, parallel_form

__all__ = ["CHUNK_SIZES", "FEATURE_MAPS", "MAX_FEATURE_DIM", "LinearAttentionFunction", "apply_feature_map",
           "apply_in_batch_slices", "autograd", "backward", "check_chunk_size", "chunked_form", "common", "forms",
           "forward", "linear_attention", "mapped_features", "parallel_form", "plan", "states", "taylor_features"]
