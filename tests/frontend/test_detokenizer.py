import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from frontend.detokenizer import IncrementalDetokenizer, SequenceText, StopStringMatcher

from tests.frontend.model_files import tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path_factory.mktemp("smollm2-tokenizer")))


MULTIBYTE_TEXTS = [
    "Hello 世界 😀 café — naïve 🇫🇷 flags",
    "日本語のテキストです。絵文字👨‍👩‍👧もあります",
    "plain ascii text, nothing special",
    "Ελληνικά και русский текст 🎉🎉",
]


def _stream(tok, prompt_ids, ids, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids, **kw)
    deltas = [detok.decode_next(i) for i in ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_equals_full_decode_and_never_splits_a_character(tok, text):
    prompt = tok.encode("Say something:")
    ids = tok.encode(text)
    deltas, rest = _stream(tok, prompt, ids)
    assert "".join(deltas) + rest == tok.decode(ids)
    assert rest == ""
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_split_over_byte_tokens_is_held_until_complete(tok):
    ids = tok.encode(" 😀")  # byte-level BPE: the emoji spans several tokens
    assert len(ids) >= 2
    assert "\ufffd" in tok.decode(ids[:1])
    deltas, _ = _stream(tok, tok.encode("x"), ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert "".join(deltas) == " 😀"


def test_sequence_ending_mid_character_is_flushed(tok):
    ids = tok.encode(" 😀")
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    held = "".join(detok.decode_next(i) for i in ids[:-1])
    assert "\ufffd" not in held
    assert held + detok.flush() == tok.decode(ids[:-1])


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("Hi there") + [tok.eos_token_id] + tok.encode(" more")
    skipped, _ = _stream(tok, [1], ids, skip_special_tokens=True)
    kept, _ = _stream(tok, [1], ids, skip_special_tokens=False)
    assert "".join(skipped) == "Hi there more"
    assert "".join(kept) == "Hi there<|im_end|> more"


def _wordpiece_tokenizer():
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    t = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    t.add_special_tokens(["[CLS]", "[SEP]"])
    return t


def test_spaces_between_special_tokens():
    t = _wordpiece_tokenizer()
    ids = [3, 1, 2, 4, 5]  # hello [CLS] [SEP] world ##s
    with_spaces, _ = _stream(t, [3], ids, skip_special_tokens=False, spaces_between_special_tokens=True)
    without, _ = _stream(t, [3], ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(with_spaces) == " hello [CLS] [SEP] worlds"
    assert "".join(without) == " hello [CLS][SEP] worlds"


def test_stop_matcher_finds_earliest_stop_in_new_text():
    m = StopStringMatcher(["world", "lo w"], include_in_output=False)
    assert m.find("hello world", new_chars=5) == ("lo w", 3)  # both end in the new text: the earliest wins
    assert m.find("hello world", new_chars=3) == ("world", 6)  # "lo w" ended before the new text
    assert m.find("hello world", new_chars=0) is None
    m_incl = StopStringMatcher(["world"], include_in_output=True)
    assert m_incl.find("hello world!", new_chars=2) == ("world", 11)


def test_stop_matcher_holdback_only_for_possible_stop_prefixes():
    m = StopStringMatcher(["STOP", "\n\n"], include_in_output=False)
    assert m.holdback("abc ST") == 2
    assert m.holdback("abc S") == 1
    assert m.holdback("abc\n") == 1
    assert m.holdback("abc SX") == 0
    assert StopStringMatcher(["STOP"], include_in_output=True).holdback("abc ST") == 0


def test_stop_string_across_token_boundaries_is_cut(tok):
    text = "The capital of France is Paris, a city of light."
    ids = tok.encode(text)
    stop = "is Par"  # spans the " is" and " Paris" tokens
    seq = SequenceText(tok, tok.encode("Q:"), [stop])
    hit = None
    for i in ids:
        hit = seq.add_tokens([i])
        if hit:
            break
    assert hit == stop
    assert seq.text == "The capital of France "


def test_stop_string_included_when_asked(tok):
    ids = tok.encode("one two three four")
    seq = SequenceText(tok, [1], ["three"], include_stop_str_in_output=True)
    hit = None
    for i in ids:
        hit = seq.add_tokens([i])
        if hit:
            break
    assert hit == "three"
    assert seq.text == "one two three"


def test_stop_string_not_matched_within_min_tokens(tok):
    ids = tok.encode("stop here and stop again")
    seq = SequenceText(tok, [1], ["stop"], min_tokens=2)
    hit = None
    for i in ids:
        hit = seq.add_tokens([i])
        if hit:
            break
    assert hit == "stop"
    assert seq.text == "stop here and "


def test_streaming_holds_back_possible_stop_prefix(tok):
    seq = SequenceText(tok, [1], ["Paris!"])
    for i in tok.encode("It is Paris"):
        seq.add_tokens([i])
    assert seq.text == "It is Paris"
    assert seq.text[: seq.visible_len(False)] == "It is "
    assert seq.visible_len(True) == len("It is Paris")


def test_stop_token_text_left_out_unless_included(tok):
    ids = tok.encode("Done") + [tok.eos_token_id]
    excluded = SequenceText(tok, [1], [], skip_special_tokens=False)
    excluded.add_tokens(ids, stop_token_terminated=True)
    included = SequenceText(tok, [1], [], include_stop_str_in_output=True, skip_special_tokens=False)
    included.add_tokens(ids, stop_token_terminated=True)
    assert excluded.text == "Done"
    assert included.text == "Done<|im_end|>"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deferred_decoding_gives_the_incremental_text(tok, skip_special_tokens):
    import random

    rng = random.Random(0)
    pool = sorted({i for t in MULTIBYTE_TEXTS for i in tok.encode(t)}) + [0, 1, 2]
    for trial in range(300):
        ids = [rng.choice(pool) if trial % 2 else rng.randrange(len(tok)) for _ in range(rng.randint(1, 25))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        stop_token = trial % 3 == 0
        texts = []
        for deferred in (False, True):
            seq = SequenceText(tok, prompt, [], skip_special_tokens=skip_special_tokens, deferred=deferred)
            for k in range(0, len(ids), 3):  # several tokens per step, as with speculative decoding
                chunk = ids[k:k + 3]
                seq.add_tokens(chunk, stop_token_terminated=stop_token and k + 3 >= len(ids))
            seq.finish()
            texts.append(seq.text)
        assert texts[0] == texts[1], (prompt, ids)


def test_deferred_decoding_is_off_with_stop_strings(tok):
    seq = SequenceText(tok, [1], ["is"], deferred=True)
    assert seq.add_tokens(tok.encode("This is it")) == "is"
    assert seq.text == "Th"
