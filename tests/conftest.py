import os

import pytest
from hypothesis import HealthCheck, settings

import minikernels as mk  # noqa: F401  (selects the backend before anything imports triton)

# Bounded example counts: the interpreter is slow, and `make test` has a 30-minute budget on 2 cores.
# derandomize: CI draws the same examples every run (a red CI must be reproducible); the GPU
# profile explores freshly each time.
settings.register_profile("interpreter", max_examples=15, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("cuda", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", mk.backend()))


def pytest_collection_modifyitems(config, items):
    if mk.backend() == "cuda":
        return
    skip = pytest.mark.skip(reason="GPU-only sweep (runs in `make gpu-check` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
