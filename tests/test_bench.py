"""The benchmark's own kernel: the floor it reports must come from the work it claims to do."""

import torch

import minikernels as mk
from minikernels import bench


def test_exp2_only_sums_the_exponentials_it_claims():
    # each lane sums 2^(x0 - k 1e-6) for k = 1..steps, x0 = -(lane % 1024) 1e-3: checked against PyTorch
    programs, block, steps = 2, 1024, 5
    out = torch.full((programs * block,), float("nan"), device=mk.device())
    bench._exp2_only[(programs,)](out, steps, BLOCK=block)
    x = (torch.arange(programs * block) % 1024).float() * -1e-3
    want = torch.zeros_like(x)
    for _ in range(steps):
        x = x - 1e-6
        want += torch.exp2(x)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=0)
