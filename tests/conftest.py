import os

# One torch thread per process: the suite runs on 2-core CI machines where the test process, a server's API process
# and its engine process compete for the cores, and oversubscribed OpenMP pools make the tiny-model tests many times
# slower. Set before torch is imported, so the server subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is decorated, so it must be
# set before any test module imports kernels/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
