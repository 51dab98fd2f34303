"""Adapters that plug minikernels into other libraries.

Each submodule imports its library on import, so ``import minikernels`` never needs them:
``minikernels.integrations.transformers`` needs Hugging Face ``transformers`` (the ``hf`` extra).
"""
