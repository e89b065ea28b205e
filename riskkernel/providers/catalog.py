"""Every provider and metered route rk knows, and whose API an unmetered request is for."""

from __future__ import annotations

from collections.abc import Mapping

from riskkernel.providers import Provider, anthropic, openai

PROVIDERS = (openai.PROVIDER, anthropic.PROVIDER)
ENDPOINTS = (*openai.ENDPOINTS, *anthropic.ENDPOINTS)
FREE_POSTS = (anthropic.COUNT_TOKENS,)  # POSTs that are forwarded and recorded as unmetered and free


def provider_for(path: str, headers: Mapping[str, str]) -> Provider:
    """Whose API an unmetered request is for, when the path alone does not say (both have GET /v1/models):
    Anthropic's SDKs always send `anthropic-version`."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return anthropic.PROVIDER
    return openai.PROVIDER
