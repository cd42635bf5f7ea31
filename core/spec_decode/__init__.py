"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), verification of the drafts in one target
forward (``rejection_sampler``), and the acceptance counters vLLM reports (``metrics``)."""
