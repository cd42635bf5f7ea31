"""pagedserve's user-facing side: the offline ``LLM`` class, the OpenAI-compatible server and the CLI.

``LLM`` is imported lazily so that ``import frontend`` (the API server's process) never loads the engine core.
"""

from ipc.messages import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from frontend.llm import LLM

        return LLM
    raise AttributeError(f"module 'frontend' has no attribute {name!r}")
