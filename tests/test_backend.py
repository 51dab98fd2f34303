"""Backend selection happens on import, before triton is imported."""

import os
import subprocess
import sys

import pytest
import torch

import minikernels as mk


def _backend_in_subprocess(env_update):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    code = "import minikernels as mk; print(mk.backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_backend_matches_machine():
    expected = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0" \
        else "interpreter"
    assert mk.backend() == expected
    assert mk.device().type == ("cuda" if expected == "cuda" else "cpu")


def test_automatic_choice():
    result = _backend_in_subprocess({})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("cuda" if torch.cuda.is_available() else "interpreter")


def test_user_choice_is_kept():
    result = _backend_in_subprocess({"TRITON_INTERPRET": "1"})
    assert result.stdout.strip() == "interpreter", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, TRITON_INTERPRET=0 is simply the GPU")
def test_no_backend_is_a_clear_error():
    result = _backend_in_subprocess({"TRITON_INTERPRET": "0"})
    assert result.returncode != 0
    assert "minikernels has no backend" in result.stderr
