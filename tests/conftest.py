"""Shared fixtures: deterministic seeds and GPU-test skipping; Triton's CPU interpreter on CPU machines."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it first
# (transformers does, through powerattn.hf): set it before collection so the kernel tests run in the
# interpreter whatever the order. The "auto" backend stays "torch" on CPU either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
