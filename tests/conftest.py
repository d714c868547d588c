import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random data per test, reproducible per test run.
    torch.manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("FASTLORA_RANDOM_SEED") else 1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
