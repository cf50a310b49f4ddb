import os
from collections.abc import Iterator

import pytest
import torch

# Two cores: keep every test process single-threaded so gloo peers don't starve each other.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _environment_as_found() -> Iterator[None]:
    """Each test leaves the environment as it found it: code run in this process (the CLI, a
    Lightning fit) may set variables, and a LOCAL_RANK left behind once made a later 2-process fit
    wait for a rank 1 that Lightning never started."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # every integration test (a CLI, a launcher, a bench: a fresh interpreter importing torch and
    # Lightning, often several) is slow; `pytest -m "not slow"` is the day-to-day tier
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.slow)
    # bench/gpu_check.sh --device cpu runs the gpu-marked tests on the CPU, to check that they run
    if torch.cuda.is_available() or os.environ.get("LOCALSGD_GPU_CHECK_DEVICE") == "cpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
