import os
import shutil

# Without a GPU, Triton's kernels run on CPU tensors under its interpreter, which must be
# chosen before triton is first imported (torch may import it): so here, before torch, and
# by a check that does not import torch.
if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
