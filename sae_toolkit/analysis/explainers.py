"""Chat clients that `explain` asks for feature explanations and detection labels: an OpenAI-compatible HTTP
endpoint (urllib only, no new dependency) or a local Hugging Face chat model.

Both have one method, ``chat(messages, max_tokens) -> str``, with messages ``[{"role": ..., "content": ...}]``;
anything with that method (a test's fake, another API's wrapper) can stand in for them.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Protocol

from sae_toolkit.errors import SAEToolkitError

__all__ = ["ChatClient", "HFChat", "OpenAIChat", "make_explainer"]


class ChatClient(Protocol):
    """What `explain` needs from an explainer."""

    name: str
    """Recorded in explanations.jsonl (the endpoint and model, or the model spec)."""

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The assistant's reply to ``messages`` (deterministic where the backend allows: temperature 0)."""
        ...


class OpenAIChat:
    """POST {base_url}/chat/completions with temperature 0; the model is ``model`` or the first of GET /models."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.model = model or self._first_model()
        self.name = f"{self.base_url} {self.model}"

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            hint = "; set the API key in the variable --api-key-env names" if e.code in (401, 403) else ""
            raise SAEToolkitError(f"explainer {self.base_url}{path} answered HTTP {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SAEToolkitError(f"cannot reach explainer {self.base_url}{path} ({reason}); is the server running "
                                  "and is the URL its /v1 base?") from None
        except json.JSONDecodeError:
            raise SAEToolkitError(f"explainer {self.base_url}{path} did not answer JSON; give the OpenAI-compatible "
                                  "/v1 base URL") from None

    def _first_model(self) -> str:
        try:
            return str(self._request("/models")["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise SAEToolkitError(f"explainer {self.base_url}/models lists no model; name one with "
                                  "--explainer-model") from None

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        out = self._request("/chat/completions", {"model": self.model, "messages": messages, "temperature": 0,
                                                  "max_tokens": max_tokens})
        try:
            return str(out["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise SAEToolkitError(f"explainer {self.base_url} answered without choices[0].message.content: "
                                  f"{json.dumps(out)[:200]}") from None


class HFChat:
    """A local chat model (a model SPEC as for --model), greedy decoding through its chat template."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        from sae_toolkit.model.loading import load_model

        self.model, self.tokenizer = load_model(spec, device=device)
        self.device = device
        self.name = spec

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:  # base models: a plain transcript
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            ids = tok(text, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_explainer(spec: str, *, api_key_env: str = "OPENAI_API_KEY", model: str | None = None,
                   device: str = "cpu") -> ChatClient:
    """``http(s)://host:port/v1`` → OpenAIChat (key from $api_key_env, none when unset: local servers need none);
    anything else → HFChat(spec) as a model SPEC."""
    if spec.startswith(("http://", "https://")):
        return OpenAIChat(spec, model=model, api_key=os.environ.get(api_key_env) or None)
    if model:
        raise SAEToolkitError(f"--explainer-model {model!r} names an endpoint's model; with a local model SPEC "
                              f"({spec!r}) leave it out")
    return HFChat(spec, device=device)
