"""One forward pass of mk.flash_attention for Nsight Compute to measure; chapter 1 compares its DRAM
bytes with the predicted ones. On the GPU machine (output: book/data/bench/flash_ncu.csv):

    ncu --clock-control none --kernel-name regex:_attn_fwd --launch-skip 1 --launch-count 1 \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum --csv \
        python3 tools/ncu_flash.py > book/data/bench/flash_ncu.csv
"""

import torch

import minikernels as mk

B, H, N, D = 1, 16, 4096, 128  # bf16, not causal
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(2):  # the first launch compiles; ncu measures the second (--launch-skip 1)
    mk.flash_attention(q, k, v)
torch.cuda.synchronize()
