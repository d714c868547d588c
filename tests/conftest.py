import os
import shutil
import sys
import zlib

# Without a GPU, Triton's kernels run on CPU tensors under its interpreter, which must be
# chosen before triton is first imported (torch may import it): so here, before torch, and
# by a check that does not import torch.
if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["pytester"]


# One seeding policy for the suite: fresh random data on every run, from a session seed that
# the header prints; `FASTLORA_SEED=N pytest` replays a run. Each test's seed is derived from
# the session seed and the test's id, so it does not depend on which other tests ran.
SESSION_SEED = int(os.environ.get("FASTLORA_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_report_header(config):
    return f"fastlora random seed: FASTLORA_SEED={SESSION_SEED}"


def seed_for(nodeid: str) -> int:
    return (SESSION_SEED + zlib.crc32(nodeid.encode())) % 2**32


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(seed_for(request.node.nodeid))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator for the test's data, seeded by the suite's policy (see `SESSION_SEED`)."""
    return torch.Generator().manual_seed(seed_for(request.node.nodeid))


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
