"""The kernels package shares its import name with Hugging Face's ``kernels``: a name only that package has gets an
error that says so, while our own modules still import through ``from kernels import ...``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest


def test_hugging_face_names_get_an_error_that_names_the_clash():
    kernels = importlib.import_module("kernels")
    with pytest.raises(ImportError, match="Hugging Face's `kernels`.*transformers<5.25"):
        kernels.CUDAProperties  # noqa: B018 - the attribute access is the test
    with pytest.raises(ImportError, match="Hugging Face"):
        exec("from kernels import LayerRepository", {})


def test_our_modules_still_import_by_name_in_a_fresh_process():
    """``from kernels import <module>`` before the module was imported goes through the package's ``__getattr__``,
    which must hand it to the import system."""
    code = "from kernels import pdl, split_k; print(pdl.__name__, split_k.__name__)"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kernels.pdl", "kernels.split_k"]
