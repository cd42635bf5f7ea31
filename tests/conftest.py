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


@pytest.fixture(scope="session")
def smollm_server():
    """One `pagedserve serve` of the default model (SmolLM2 GGUF, tool calling on) for every module that needs the real
    model behind HTTP: starting it (loading and dequantizing the GGUF) is the costly part on a 2-core CI machine.
    Modules using it must not change its state (no flags of their own, no shutdown)."""
    from tests.frontend.server_process import ServerProcess

    srv = ServerProcess(None, "--max-model-len", "1024", "--num-gpu-blocks-override", "256",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", timeout_s=600)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def transformers_smollm2():
    """transformers' fp32 model of the default GGUF (its own dequantization: ~15-30 s on 2 cores, so once per
    session), the reference for our loader and our greedy tokens. Read-only for the tests that share it.

    transformers needs ``accelerate`` for GGUF; it is in the ``test`` extras."""
    import transformers

    from core.model_source import resolve_model

    source = resolve_model(None)
    return transformers.AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                             dtype=torch.float32).eval()
