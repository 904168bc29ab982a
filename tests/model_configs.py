"""Model configs for unit tests: small, and plain unless a test asks for a part."""

from __future__ import annotations

from dataclasses import replace

from services.config import ModelConfig

PLAIN = ModelConfig(prompt_len=4, item_bias=False, item_tokens=False, causal=False,
                    readout="mean", user_layers=0)


def plain_config(prompt_len: int, **parts: bool | str) -> ModelConfig:
    """A config with `prompt_len` soft-prompt tokens and only the parts named on."""
    return replace(PLAIN, prompt_len=prompt_len, **parts)
