"""The most output a model can give one call, for a request that sets no output limit of its own.

A call's reservation is its worst case, and a request without `max_tokens` (OpenAI's are optional) may use
all the output its model allows. The table holds the published maximum of OpenAI's model families, first
match wins; Anthropic's requests always carry `max_tokens`. A model not in it is reserved DEFAULT_OUTPUT.
"""

from __future__ import annotations

import functools
import re

DEFAULT_OUTPUT = 32_768  # output tokens reserved for a call with no limit to a model not in the table

_LIMITS = (
    (r"gpt-5", 128_000),
    (r"o\d", 100_000),  # o1, o3, o4-mini and their dated snapshots
    (r"gpt-4\.1", 32_768),
    (r"(chatgpt-)?gpt-4o", 16_384),
    (r"gpt-4-(turbo|\d{4}-preview|vision)", 4_096),
    (r"gpt-4(-\d{4})?$", 8_192),
    (r"gpt-3\.5", 4_096),
)


@functools.lru_cache(maxsize=256)
def output_limit(model: str) -> int:
    name = model.lower().removeprefix("openai/")
    for pattern, limit in _LIMITS:
        if re.match(pattern, name):
            return limit
    return DEFAULT_OUTPUT
