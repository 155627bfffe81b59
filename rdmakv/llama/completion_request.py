"""Which completion requests the auto-cache manages, and what they ask (pure: bytes in, a plan out).

Managed: ``POST /completion``, ``/completions``, ``/v1/completions``, ``/chat/completions`` and
``/v1/chat/completions`` asking for one completion of one text prompt (a string, token ids, or
llama-server's mixed list), streamed or not. Everything else goes to llama-server untouched:
several prompts or completions at once (they take several slots), media, an explicit
``cache_prompt: false``, or a body that is not a JSON object (llama-server answers those in
its own words).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

ENDPOINTS = {"/completion": "native", "/completions": "native", "/v1/completions": "oai",
             "/chat/completions": "chat", "/v1/chat/completions": "chat"}  # fmt: skip


@dataclass(frozen=True)
class Completion:
    kind: str  # "native", "oai" or "chat"
    body: dict
    prompt: Any  # what /tokenize takes (a string or a token/mixed list); None for chat (templated first)
    pinned: int | None  # the client's own id_slot
    stream: bool

    def forwarded(self, slot: int) -> bytes:
        """The body llama-server gets: pinned to the proxy's slot, with prompt caching on."""
        return json.dumps(dict(self.body, id_slot=slot, cache_prompt=True)).encode()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_prompt(prompt: Any) -> Any:
    """The single prompt the body asks for, or None when it is not exactly one text prompt."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # ["text"] or [[ids]]: one prompt in a list
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) or isinstance(t, str) for t in prompt):
        # ids, or ids mixed with strings: one prompt; a list of strings only is several prompts
        return prompt if any(_is_int(t) for t in prompt) else None
    return None


def _text_only(messages: Any) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    for m in messages:
        if not isinstance(m, dict):
            return False
        content = m.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return False  # images, audio, files: media go to llama-server untouched
    return True


def parse(path: str, raw: bytes) -> Completion | None:
    """The completion ``raw`` asks for at ``path``, or None when the auto-cache leaves it alone."""
    kind = ENDPOINTS.get(path)
    if kind is None:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("cache_prompt", True) is not True:
        return None
    if any(body.get(k, 1) != 1 for k in ("n", "n_cmpl")) or "multimodal_data" in body:
        return None
    pinned = body.get("id_slot", -1)
    if not _is_int(pinned) or pinned < -1:
        return None
    if kind == "chat":
        if not _text_only(body.get("messages")):
            return None
        prompt = None
    else:
        prompt = _one_prompt(body.get("prompt"))
        if prompt is None:
            return None
    return Completion(kind, body, prompt, None if pinned == -1 else pinned, body.get("stream") is True)


def model_key(models: Any, extra: str = "") -> str:
    """The model's identity from llama-server's ``GET /v1/models`` (its file name and shape), plus
    the operator's ``--cache-key``: prefixes are only ever reused under the same key."""
    data = models.get("data") if isinstance(models, dict) else None
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    meta = found if isinstance(found := first.get("meta"), dict) else {}
    shape = {k: v for k, v in meta.items() if k != "n_ctx"}  # the context size is configuration
    name = os.path.basename(str(first.get("id", "")))
    return json.dumps({"model": name, "meta": shape, "key": extra}, sort_keys=True)
