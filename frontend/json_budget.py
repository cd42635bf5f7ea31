"""A bound on how many JSON values a request body holds, checked on the raw bytes before it is parsed.

Why: decoding and validating JSON holds the GIL for the whole call, worker thread or not. A 21 MB array of
2.5 million token ids (or 500,000 chat messages) took 0.8 s (3.5 s) of the API process's GIL, so ``/health`` and
every stream waited that long. The time grows with the number of values, not the bytes (a 20 MB string parses in
a few milliseconds), so a body with more values than ``--max-request-json-values`` is refused (413) before
parsing. Counting is cheap: a first bound from counting ``,``, ``[`` and ``{`` bytes (numpy comparisons, which
release the GIL: three ``bytes.count`` passes over 20 MB held it for 60-80 ms here); only when that bound is over
the limit, an exact count that skips string contents (so commas in a prompt's text do not count), in a loop of C
``find``/count calls that hands the GIL back between them.
"""

from __future__ import annotations

import numpy as np

from frontend.protocol import OpenAIError

DEFAULT_MAX_JSON_VALUES = 200_000
_NUMPY_MIN_BYTES = 64 * 1024  # below this, bytes.count is quicker than numpy's call overhead
_STRUCTURAL = (ord(","), ord("["), ord("{"))

_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def values_upper_bound(body: bytes, start: int = 0, end: int | None = None) -> int:
    """At least the number of JSON values in ``body[start:end]``: each value follows a comma or opens its
    container (commas and brackets inside strings only make it larger)."""
    end = len(body) if end is None else end
    if end - start < _NUMPY_MIN_BYTES:
        return body.count(b",", start, end) + body.count(b"[", start, end) + body.count(b"{", start, end) + 1
    view = np.frombuffer(body, dtype=np.uint8)[start:end]  # no copy
    return sum(int(np.count_nonzero(view == c)) for c in _STRUCTURAL) + 1


def count_json_values(body: bytes, limit: int) -> int:
    """The number of JSON values (the top-level one, array elements, object members; an empty container counts
    one) outside strings; counting stops soon after ``limit`` is passed. Malformed JSON gives some count: the parser reports it afterwards."""
    count = 1
    pos, n = 0, len(body)
    while pos < n and count <= limit:
        quote = body.find(b'"', pos)
        stop = n if quote < 0 else quote
        count += values_upper_bound(body, pos, stop) - 1
        if quote < 0:
            break
        pos = _string_end(body, quote + 1) + 1
    return count


def _string_end(body: bytes, pos: int) -> int:
    """The index of the quote closing the string whose contents start at ``pos`` (or the end of ``body``)."""
    while True:
        quote = body.find(b'"', pos)
        if quote < 0:
            return len(body)
        backslashes = 0
        k = quote - 1
        while k >= pos and body[k] == _BACKSLASH:
            backslashes += 1
            k -= 1
        if backslashes % 2 == 0:
            return quote
        pos = quote + 1


def check_json_values(body: bytes, limit: int) -> None:
    """413 when the body holds more than ``limit`` JSON values (run it off the event loop for big bodies)."""
    if limit <= 0 or values_upper_bound(body) <= limit:
        return
    count = count_json_values(body, limit)
    if count > limit:
        raise OpenAIError(
            f"The request body holds more than {limit} JSON values (array elements and object members); the "
            "server's --max-request-json-values caps it so that parsing one request cannot stall the others.",
            status_code=413)
