"""Triton kernels (and the one Gluon kernel), each beside its plain-torch reference.

This package's import name is also that of Hugging Face's ``kernels`` package, which transformers >= 5.25 requires
and imports (``from kernels import CUDAProperties, ...``) when it is installed. Only one of the two can be imported,
and it is this one (the project's root comes first on the path), so a name that is neither one of our modules nor
defined here is answered with an error that says what happened instead of a bare ImportError."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def __getattr__(name: str):
    if (_HERE / f"{name}.py").exists() or (_HERE / name / "__init__.py").exists() or name.startswith("__"):
        raise AttributeError(name)  # a module of ours not imported yet: the import system loads it
    raise ImportError(
        f"'{name}' is not in pagedserve's kernels package: something imported it expecting Hugging Face's `kernels` "
        "package, which shares the import name (transformers >= 5.25 requires it). pagedserve needs "
        "transformers<5.25 without Hugging Face `kernels` installed: pip install 'transformers<5.25' && "
        "pip uninstall kernels"
    )
