"""The sandboxed chat-template renderer: same text as transformers for the model's template, bounded otherwise."""

from __future__ import annotations

import contextlib
import gc
import time

import pytest

from frontend.chat_template import TemplateLimitError, render_chat_template
from tests.frontend.model_files import tokenizer_dir


@contextlib.contextmanager
def garbage_collection_paused():
    """A timed render must not pay for the test session's garbage: late in the full suite (torch, transformers and
    many engines' objects alive) one full collection takes about a second of CPU, and a render that allocates can
    trigger it (the likely cause of a CI run's 1.32 s). Collected first, then paused while the render is timed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_matches_transformers_on_the_models_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(tmp_path / "tok")))
    ours = render_chat_template(tok.chat_template, CONVERSATION, add_generation_prompt=True,
                                continue_final_message=False, special_tokens=dict(tok.special_tokens_map))
    assert ours == tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [
    "{{ 'x' * 50000000 }}",
    "{{ [1] * 10**9 }}",
    "{{ 10 ** 100000 }}",
    "{{ 'a'|center(10**9) }}",
    "{% for i in range(50) %}{{ 'y' * 100000 }}{% endfor %}",
])
def test_output_size_is_bounded(template):
    # This thread's CPU time, not the wall clock: the limit must stop the work early, and on a busy 2-core CI
    # machine the wall clock also counts time the thread waited for a core (one run measured 1.003 s that way).
    with garbage_collection_paused():
        start = time.thread_time()
        with pytest.raises(TemplateLimitError):
            render_chat_template(template, CONVERSATION, add_generation_prompt=True, continue_final_message=False,
                                 special_tokens={}, max_output_chars=1_000_000)
        assert time.thread_time() - start < 1.0


def test_time_is_bounded_even_for_loops_that_call_nothing():
    template = ("{% set l = range(20000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}")
    with garbage_collection_paused():
        start = time.monotonic()
        with pytest.raises(TemplateLimitError, match="longer than"):
            render_chat_template(template, CONVERSATION, add_generation_prompt=True, continue_final_message=False,
                                 special_tokens={}, time_limit_s=0.3)
        assert time.monotonic() - start < 2.0
