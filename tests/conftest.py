import os
import shutil
import sys

# Without a GPU, Triton's kernels run on CPU tensors under its interpreter, which must be
# chosen before triton is first imported (torch may import it): so here, before torch, and
# by a check that does not import torch.
if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random data per test, reproducible per test run.
    torch.manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("FASTLORA_RANDOM_SEED") else 1234)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # A test that compared with a bitsandbytes call found wrong on this CPU (`oracles`) ran
    # its assertions against the exact formula instead; it passes as skipped, saying so.
    oracles = sys.modules.get("oracles")
    if oracles is not None:
        oracles.take_wrong_calls()
    result = yield
    wrong = oracles.take_wrong_calls() if oracles is not None else []
    if wrong:
        pytest.skip(f"{len(wrong)} comparison(s) with bitsandbytes skipped: {wrong[0]}")
    return result


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
