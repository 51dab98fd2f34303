"""Chapter 4: Mamba's selective scan (``mk.selective_scan``), with ``mamba_ssm.selective_scan_fn``'s conventions.

Symbols are the book's: N is the sequence length and n the state size (the code keeps mamba_ssm's
names for them, L and N, in the kernels' arguments as on the host). For each batch b and channel d,
a diagonal state h of n entries:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,      y_t = C_t . h_t  (+ D u_t, then * silu(z_t))

Input-dependent delta, B, C break the convolution view of a time-invariant SSM, but each step is an
affine map h -> a h + b, and composing affine maps is associative:

    (a1, b1) • (a2, b2) = (a1 a2, a2 b1 + b2)

where (a1, b1) • (a2, b2) applies step 1 first, then step 2 (the reverse of the usual order of
function composition: it is f2 ∘ f1), so the recurrence is a parallel scan
(``tl.associative_scan``). The forward: one program (one warp) owns BD channels of one batch and all
n states, and walks the whole sequence two chunks of T steps at a time (one for n from 33 to 64)
with the state in registers; a chunk is a [BD, n, T] tile whose T steps lie inside one thread, so
the scan is a chain of multiply-adds in each thread and only the sum over states for y crosses
threads. B and C are laid out once, on the host, in chunk-major order (_chunk_major; bf16 stays bf16
up to n = 32, two steps per 32-bit word, else float32). The backward has the same tiles and walks
the sequence in reverse, a segment of 32 steps at a time on the GPU (16 in the interpreter; the
forward saved the state entering each): a first pass recomputes the states entering the segment's
chunks, then the chunks are taken last to first; in each, h is rebuilt from the state entering it
and, with dh_t = d𝓛/dh_t (the book's notation for gradients), the same scan runs backwards in time
(its steps reversed in registers):

    dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}

with exp(delta_t A) h_{t-1} = h_t - delta_t B_t u_t (no division) for the gradients of delta and A.
The elementwise parts (delta_bias and softplus on the way in, D and the z gate on the way out)
are fused into both kernels, so the forward reads u, delta and z once and writes the output once
(B and C, a few megabytes, come from L2 to every program), the bytes of the bandwidth roofline.
"""

from . import backward, forward, layout, op, plan, steps
from .op import SelectiveScanFunction, check_selective_scan_inputs, selective_scan
from .plan import BWD_CONFIG, FWD_CONFIG, MAX_GRID_Y, MAX_STATE, wide_offsets

__all__ = ["BWD_CONFIG", "FWD_CONFIG", "MAX_GRID_Y", "MAX_STATE", "SelectiveScanFunction", "backward",
           "check_selective_scan_inputs", "forward", "layout", "op", "plan", "selective_scan", "steps", "wide_offsets"]
