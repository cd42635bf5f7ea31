"""Tokenizer loading: the GGUF-embedded tokenizer matches the HF one, its on-disk cache, chat template overrides."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

import core.tokenizer as tokenizer_module
from core.model_source import ModelSource, resolve_model
from core.tokenizer import gguf_tokenizer_cache_dir, load_tokenizer, read_chat_template

REFERENCE_FILES = Path(__file__).parents[1] / "data" / "smollm2-135m"

TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "héllo wörld — naïve café, 日本語のテキスト, 한국어, Ελληνικά, emoji 🙂👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces,\ttabs\nnewlines\r\n and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # code 12345678901234567890",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """SmolLM2's HF tokenizer files (tokenizer.json is stored gzipped in the repo)."""
    directory = tmp_path_factory.mktemp("smollm2-hf")
    for file in REFERENCE_FILES.iterdir():
        if file.name == "tokenizer.json.gz":
            with gzip.open(file, "rb") as src, open(directory / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(file, directory / file.name)
    return directory


@pytest.fixture(scope="module")
def reference(reference_dir):
    return load_tokenizer(ModelSource(name="smollm2-hf", path=str(reference_dir)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        directory = tmp_path_factory.mktemp("pagedserve-cache")
        mp.setenv("PAGEDSERVE_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="module")
def gguf_source() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def gguf_tokenizer(cache_dir, gguf_source):
    """The slow conversion (~15 s), done once: later loads of the same file hit the cache."""
    return load_tokenizer(gguf_source)


def test_gguf_tokenizer_encodes_like_hf(gguf_tokenizer, reference):
    for text in TEXTS:
        assert gguf_tokenizer.encode(text) == reference.encode(text), text


def test_gguf_tokenizer_decodes_like_hf(gguf_tokenizer, reference):
    for text in TEXTS:
        ids = reference.encode(text)
        assert gguf_tokenizer.decode(ids) == reference.decode(ids) == text, text
        assert gguf_tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_gguf_tokenizer_special_tokens_match_hf(gguf_tokenizer, reference):
    assert len(gguf_tokenizer) == len(reference)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(gguf_tokenizer, attr) == getattr(reference, attr), attr


def test_gguf_chat_template_renders_like_hf(gguf_tokenizer, reference):
    for generation_prompt in (True, False):
        ours = gguf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        want = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == want
    assert ours.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_second_gguf_load_uses_cache(gguf_tokenizer, gguf_source, cache_dir, monkeypatch):
    entry = gguf_tokenizer_cache_dir(Path(gguf_source.gguf_file))
    assert entry.parent.parent == cache_dir and (entry / "tokenizer.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary leftovers

    def no_conversion(_):
        raise AssertionError("the tokenizer was converted again instead of read from the cache")

    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", no_conversion)
    again = load_tokenizer(gguf_source)
    assert again.encode(TEXTS[2]) == gguf_tokenizer.encode(TEXTS[2])


def test_cache_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF-one")
    first = gguf_tokenizer_cache_dir(model)
    assert first.parent == tmp_path / "cache" / "tokenizers"
    model.write_bytes(b"GGUF-longer")  # new size (and mtime): another entry
    assert gguf_tokenizer_cache_dir(model) != first


@pytest.mark.parametrize("damage", ["corrupt", "empty"])
def test_damaged_cache_entry_is_rebuilt(damage, tmp_path, monkeypatch, reference_dir, gguf_source):
    """A converter stand-in (the HF tokenizer) keeps this fast; what is tested is the cache's recovery."""
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    conversions = []

    def fake_conversion(gguf_file):
        conversions.append(gguf_file)
        return tokenizer_module._from_pretrained(reference_dir)

    monkeypatch.setattr(tokenizer_module, "_convert_gguf_tokenizer", fake_conversion)
    entry = gguf_tokenizer_cache_dir(Path(gguf_source.gguf_file))
    entry.mkdir(parents=True)
    if damage == "corrupt":
        (entry / "tokenizer.json").write_text("{not json")
        (entry / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer(gguf_source)
    assert len(conversions) == 1
    assert tok.encode("Hello, world!") == [19556, 28, 905, 17]
    assert (entry / "tokenizer.json").stat().st_size > 1_000_000  # rebuilt entry is whole
    load_tokenizer(gguf_source)
    assert len(conversions) == 1  # and now it is used


def test_directory_tokenizer_is_local(reference):
    assert reference.encode("Hello, world!") == [19556, 28, 905, 17]


def test_tokenizer_argument_overrides_source(reference_dir, reference, tmp_path):
    source = ModelSource(name="elsewhere", path=str(tmp_path))  # no tokenizer files there
    with pytest.raises(ValueError, match="Cannot load a tokenizer from"):
        load_tokenizer(source)
    tok = load_tokenizer(source, tokenizer=str(reference_dir))
    assert tok.encode(TEXTS[2]) == reference.encode(TEXTS[2])


def test_tokenizer_argument_needs_no_model_config(reference_dir, reference, tmp_path):
    """``tokenizer`` may be a directory of tokenizer files alone (no config.json), as vLLM's ``--tokenizer`` takes."""
    files_only = tmp_path / "tokenizer-files"
    files_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference_dir / name, files_only / name)
    tok = load_tokenizer(ModelSource(name="elsewhere", path=str(tmp_path)), tokenizer=str(files_only))
    assert tok.encode(TEXTS[2]) == reference.encode(TEXTS[2])


def test_inline_chat_template_overrides(reference_dir):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(ModelSource(name="hf", path=str(reference_dir)), chat_template=template)
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "[user] What is the capital of France?\n"


def test_chat_template_file_overrides(reference_dir, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{{ messages[-1]['content'] | upper }}")
    tok = load_tokenizer(ModelSource(name="hf", path=str(reference_dir)), chat_template=str(template_file))
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "WHAT IS THE CAPITAL OF FRANCE?"


def test_chat_template_that_is_neither_file_nor_jinja_raises(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
