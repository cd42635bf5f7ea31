import pytest
from pydantic import ValidationError

from frontend.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, resolve_max_tokens


def _chat(**kw):
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest(**kw)


def test_completion_maps_openai_and_vllm_fields():
    req = CompletionRequest(prompt="x", max_tokens=7, temperature=0.5, top_p=0.9, n=2, seed=3, stop="##",
                            logprobs=2, top_k=5, min_p=0.1, repetition_penalty=1.2, ignore_eos=True, min_tokens=1,
                            stop_token_ids=[9], skip_special_tokens=False, presence_penalty=0.5,
                            frequency_penalty=-0.5, logit_bias={"42": 3.0})
    p = req.to_sampling_params(prompt_len=3, max_model_len=100)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.seed, p.stop, p.logprobs) == (7, 0.5, 0.9, 2, 3, ["##"], 2)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.min_tokens) == (5, 0.1, 1.2, True, 1)
    assert p.stop_token_ids == [9] and p.skip_special_tokens is False
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -0.5, {42: 3.0})


def test_completion_default_max_tokens_is_16_capped_by_context():
    assert CompletionRequest(prompt="x").to_sampling_params(3, 100).max_tokens == 16
    assert CompletionRequest(prompt="x").to_sampling_params(95, 100).max_tokens == 5


def test_chat_default_max_tokens_fills_the_context():
    assert _chat().to_sampling_params(30, 100).max_tokens == 70
    assert _chat(max_completion_tokens=5, max_tokens=9).to_sampling_params(30, 100).max_tokens == 5
    assert _chat(max_tokens=9).to_sampling_params(30, 100).max_tokens == 9


def test_chat_logprobs_mapping():
    assert _chat(logprobs=True, top_logprobs=3).to_sampling_params(1, 100).logprobs == 3
    assert _chat(logprobs=True).to_sampling_params(1, 100).logprobs == 0
    assert _chat().to_sampling_params(1, 100).logprobs is None


@pytest.mark.parametrize("field,value,param", [
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("n", 0, "n"),
    ("top_k", -2, "top_k"),
    ("min_p", 2.0, "min_p"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("logprobs", 21, "logprobs"),
    ("logit_bias", {"abc": 1.0}, "logit_bias"),
    ("max_tokens", 0, "max_tokens"),
    ("min_tokens", 99, "min_tokens"),
])
def test_completion_invalid_values_name_their_param(field, value, param):
    req = CompletionRequest(prompt="x", **{field: value})
    with pytest.raises(OpenAIError) as info:
        req.to_sampling_params(prompt_len=3, max_model_len=100)
    assert info.value.status_code == 400 and info.value.param == param


def test_context_checks():
    with pytest.raises(OpenAIError, match="maximum context length") as info:
        resolve_max_tokens(None, 16, prompt_len=100, max_model_len=100, param="max_tokens")
    assert info.value.param == "prompt"
    with pytest.raises(OpenAIError, match="too large") as info:
        resolve_max_tokens(20, None, prompt_len=90, max_model_len=100, param="max_completion_tokens")
    assert info.value.param == "max_completion_tokens"
    assert resolve_max_tokens(10, None, prompt_len=90, max_model_len=100, param="max_tokens") == (10, False)


def test_chat_checks():
    with pytest.raises(OpenAIError, match="at least one message"):
        _chat(messages=[]).check()
    with pytest.raises(OpenAIError, match="requires logprobs"):
        _chat(top_logprobs=2).check()
    with pytest.raises(OpenAIError, match="top_logprobs"):
        _chat(logprobs=True, top_logprobs=21).check()
    with pytest.raises(OpenAIError, match="cannot both"):
        _chat(continue_final_message=True).check()


def test_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for empty in ("", [], [[]]):
        with pytest.raises(OpenAIError, match="empty"):
            CompletionRequest(prompt=empty).prompts()


def test_bad_types_fail_validation():
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", temperature="hot")
    with pytest.raises(ValidationError):
        _chat(messages="hello")


def test_text_content_parts_joined_and_others_refused():
    req = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "a\nb"
    img = _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(OpenAIError, match="only text"):
        img.messages[0].text()


def test_logit_bias_clamped_and_keys_checked_like_vllm():
    params = CompletionRequest(prompt="x", logit_bias={"5": 200.0, "6": -300.0}).to_sampling_params(1, 100)
    assert params.logit_bias == {5: 100.0, 6: -100.0}
    with pytest.raises(OpenAIError, match="token_id `abc` in logit_bias but token_id must be an integer") as info:
        CompletionRequest(prompt="x", logit_bias={"abc": 1.0}).to_sampling_params(1, 100)
    assert info.value.param == "logit_bias"


def test_beam_search_rejected_by_name():
    with pytest.raises(OpenAIError, match="use_beam_search") as info:
        CompletionRequest(prompt="x", use_beam_search=True).to_sampling_params(1, 100)
    assert info.value.param == "use_beam_search"


def test_sampling_extras_reach_the_sampling_params():
    params = CompletionRequest(prompt="x", logprobs=0, allowed_token_ids=[1, 2],
                               logprob_token_ids=[7, 3]).to_sampling_params(1, 100)
    assert params.allowed_token_ids == [1, 2] and params.logprob_token_ids == [7, 3] and params.logprobs == 0
    with pytest.raises(OpenAIError, match="empty") as info:
        CompletionRequest(prompt="x", allowed_token_ids=[]).to_sampling_params(1, 100)
    assert info.value.param == "allowed_token_ids"
    with pytest.raises(OpenAIError, match="needs logprobs") as info:  # vLLM: the logprobs switch is still needed
        CompletionRequest(prompt="x", logprob_token_ids=[7]).to_sampling_params(1, 100)
    assert info.value.param == "logprob_token_ids"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, logprob_token_ids=[4])
    assert chat.to_sampling_params(1, 100).logprob_token_ids == [4]


def test_minus_one_means_the_whole_vocabulary_within_max_logprobs():
    """vLLM: -1 asks for every token; allowed when --max-logprobs is -1 (no limit) or at least the vocabulary."""
    params = CompletionRequest(prompt="x", logprobs=-1, prompt_logprobs=-1).to_sampling_params(
        1, 100, max_logprobs=-1, vocab_size=50)
    assert params.logprobs == 50 and params.prompt_logprobs == 50
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=-1)
    chat.check(max_logprobs=64, vocab_size=50)
    assert chat.to_sampling_params(1, 100, max_logprobs=64, vocab_size=50).logprobs == 50
    for field, make in (("logprobs", lambda: CompletionRequest(prompt="x", logprobs=-1)),
                        ("prompt_logprobs", lambda: CompletionRequest(prompt="x", prompt_logprobs=-1)),
                        ("top_logprobs", lambda: ChatCompletionRequest(
                            messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=-1))):
        with pytest.raises(OpenAIError, match="whole vocabulary") as info:
            req = make()
            if isinstance(req, ChatCompletionRequest):
                req.check(max_logprobs=20, vocab_size=50)
            req.to_sampling_params(1, 100, max_logprobs=20, vocab_size=50)
        assert info.value.param == field
    with pytest.raises(OpenAIError, match="-1 for the whole vocabulary") as info:
        CompletionRequest(prompt="x", logprobs=-2).to_sampling_params(1, 100, vocab_size=50)
    assert info.value.param == "logprobs"


def test_truncate_prompt_keeps_the_asked_side():
    from frontend.protocol import truncate_prompt

    ids = list(range(10))
    assert truncate_prompt(ids, 3, None, 100) == [7, 8, 9]
    assert truncate_prompt(ids, 3, "left", 100) == [7, 8, 9]
    assert truncate_prompt(ids, 3, "right", 100) == [0, 1, 2]
    assert truncate_prompt(ids, -1, None, 4) == [6, 7, 8, 9]
    assert truncate_prompt(ids, None, None, 4) == ids
    with pytest.raises(OpenAIError) as info:
        truncate_prompt(ids, 200, None, 100)
    assert info.value.param == "truncate_prompt_tokens"


def test_stream_usage_flags_follow_include_usage_and_force():
    from frontend.protocol import StreamOptions
    from frontend.usage import stream_usage_flags

    assert stream_usage_flags(None, False) == (False, False)
    assert stream_usage_flags(StreamOptions(), False) == (False, False)  # `stream_options: {}`: no usage
    assert stream_usage_flags(StreamOptions(include_usage=True), False) == (True, False)
    assert stream_usage_flags(StreamOptions(continuous_usage_stats=True), False) == (False, False)
    assert stream_usage_flags(StreamOptions(include_usage=True, continuous_usage_stats=True), False) == (True, True)
    assert stream_usage_flags(None, True) == (True, False)  # --enable-force-include-usage
