"""Chat backends for LLM-as-a-judge: any OpenAI-compatible endpoint, or a local checkpoint.

A backend answers :class:`ChatRequest` s (chat messages + sampling params) with reply texts, in
order. Both backends share an on-disk :class:`ResponseCache` keyed by a hash of
``(model, messages, params)``: a request answered once (and accepted by its ``validate`` callable) is
never paid for again, e.g. when an evaluation is rerun or when the judge's reference answers are
reused for the next checkpoint. Replies that fail validation are not cached, so a rerun asks again.

:class:`OpenAIChatBackend` speaks the chat-completions protocol (OpenAI, Azure-style proxies, vLLM,
SGLang, TGI ...) over the standard library's ``urllib``: a timeout per request, retries with
exponential backoff (and ``Retry-After``) on 429, 5xx, connection errors and timeouts, and a
:class:`~sgalm_jax.errors.JudgeError` naming the item on anything else (a 4xx, a body that is not
JSON, a reply without ``choices[0].message.content``). Requests run on a thread pool.

:class:`LocalChatBackend` runs any HF checkpoint through :func:`sgalm_jax.sampling.generate_text`
with the tokenizer's chat template, batching all uncached requests that share sampling params.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sgalm_jax.errors import ConfigError, JudgeError
from sgalm_jax.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion to obtain.

    ``item``: the evaluated item's id (named in every error). ``params``: OpenAI-style sampling
    params (``temperature``, ``max_tokens``, ``top_p``, ...), sent as given. ``validate``: called on
    the reply text; it raises :class:`JudgeError` for an unusable reply (then nothing is cached).
    """

    item: str
    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validate: Callable[[str], Any] | None = None


def request_key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``(model, messages, params)``: the cache key."""
    blob = json.dumps({"model": model, "messages": [dict(m) for m in messages],
                       "params": dict(params)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per answered request under ``directory/<key[:2]>/<key>.json``, written
    atomically (temporary file + rename), so concurrent writers and crashes never leave a partial
    entry. The files hold the request too, for auditing."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.hits = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> str:
        """The file of ``key``."""
        return os.path.join(self.directory, key[:2], key + ".json")

    def get(self, key: str) -> str | None:
        try:
            with open(self.path(key), encoding="utf-8") as f:
                reply = json.load(f)["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: ask again
        with self._lock:
            self.hits += 1
        return reply

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Atomic, and readable as the umask allows (mkstemp alone would leave it 0600).
        atomic_write(path, json.dumps(dict(record), ensure_ascii=False), fsync=False)


class CachedBackend(abc.ABC):
    """Cache lookup, de-duplication and validation around a subclass's :meth:`_complete`."""

    def __init__(self, model: str, cache_dir: str | os.PathLike | None = None):
        self.model = model
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None

    @abc.abstractmethod
    def _complete(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        """Replies of uncached requests, each passed through :meth:`_accept` (which validates and
        caches it) as soon as it is known; a request that failed gives its JudgeError instead."""

    def _accept(self, req: ChatRequest, reply: str) -> str:
        """Validate ``reply`` (JudgeError if unusable) and cache it; returns it."""
        if req.validate is not None:
            req.validate(reply)
        if self.cache is not None:
            key = request_key(self.model, req.messages, req.params)
            self.cache.put(key, {"key": key, "model": self.model, "item": req.item,
                                 "messages": [dict(m) for m in req.messages],
                                 "params": dict(req.params), "reply": reply})
        return reply

    def complete(self, requests: Sequence[ChatRequest], *, return_exceptions: bool = False
                 ) -> list[Any]:
        """Reply texts of ``requests``, in order (cached ones are not asked again).

        Every request is attempted (and every usable reply cached) before an error is raised; with
        ``return_exceptions`` a failed request gives its :class:`JudgeError` in place of a reply.
        """
        keys = [request_key(self.model, r.messages, r.params) for r in requests]
        replies: dict[str, Any] = {}
        todo: list[tuple[str, ChatRequest]] = []
        queued: set[str] = set()
        for key, req in zip(keys, requests):
            if key in replies or key in queued:
                continue  # an identical request in this batch: ask once
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                try:
                    if req.validate is not None:
                        req.validate(cached)
                    replies[key] = cached
                except JudgeError as e:
                    replies[key] = JudgeError(f"{e} (cached reply; delete {self.cache.path(key)} "
                                              "to ask again)")
            else:
                todo.append((key, req))
                queued.add(key)
        if todo:
            for (key, req), reply in zip(todo, self._complete([r for _, r in todo])):
                replies[key] = reply
        out = [replies[k] for k in keys]
        if not return_exceptions:
            for r in out:
                if isinstance(r, JudgeError):
                    raise r
        return out


# ------------------------------------------------------------------------------------ HTTP
_RETRY_STATUS = frozenset({408, 409, 429})


def _retryable_status(code: int) -> bool:
    return code in _RETRY_STATUS or code >= 500


def _snippet(body: bytes | str, n: int = 200) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


class OpenAIChatBackend(CachedBackend):
    """An OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
      base_url: e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (``/chat/completions``
        is appended unless already there).
      model: the model name sent in each request (part of the cache key).
      api_key_env: the environment variable holding the API key (sent as ``Authorization: Bearer``);
        None for endpoints without authentication. A named variable that is unset is a ConfigError.
      timeout: seconds per HTTP attempt.
      max_retries: further attempts after a retryable failure (429, 408, 409, 5xx, connection
        error, timeout).
      backoff, max_backoff: the wait before retry k is ``min(max_backoff, backoff * 2**k)`` (or the
        server's ``Retry-After`` if longer, capped the same way), times a random factor in
        [1, 1 + jitter].
      max_workers: concurrent requests.
      cache_dir: the :class:`ResponseCache` directory (a run's ``judge_cache``); None = no cache.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = 60.0, jitter: float = 0.1, max_workers: int = 8,
                 cache_dir: str | os.PathLike | None = None,
                 extra_headers: Mapping[str, str] | None = None):
        super().__init__(model, cache_dir)
        if not base_url:
            raise ConfigError("judge.base_url: empty")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.headers = {"Content-Type": "application/json", **dict(extra_headers or {})}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"judge.api_key_env: environment variable {api_key_env!r} is not "
                                  "set (or set api_key_env to None for an endpoint without a key)")
            self.headers["Authorization"] = f"Bearer {key}"
        if max_retries < 0 or timeout <= 0 or max_workers < 1:
            raise ConfigError(f"judge: need max_retries >= 0, timeout > 0, max_workers >= 1 (got "
                              f"{max_retries}, {timeout}, {max_workers})")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff, self.jitter = float(backoff), float(max_backoff), float(jitter)
        self.max_workers = int(max_workers)
        self.num_requests = 0  # HTTP attempts made (for logs and tests)
        self._count_lock = threading.Lock()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        delay = min(self.max_backoff, delay) * (1.0 + random.uniform(0.0, self.jitter))
        time.sleep(delay)

    def _post_once(self, body: bytes) -> tuple[int, bytes, str | None]:
        """(status, body, Retry-After) of one attempt; network failures raise OSError."""
        with self._count_lock:
            self.num_requests += 1
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read(), None
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Retry-After") if e.headers else None

    def _ask(self, req: ChatRequest) -> str:
        payload = {"model": self.model, "messages": [dict(m) for m in req.messages],
                   **dict(req.params)}
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                status, data, retry_after = self._post_once(body)
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
                status, data, retry_after = None, b"", None
            if status == 200:
                return self._content(req, data)
            if status is not None:
                last = f"HTTP {status}: {_snippet(data)}"
                if not _retryable_status(status):
                    raise JudgeError(f"judge item {req.item!r}: {self.url} answered {last}")
            if attempt < self.max_retries:
                log.warning("judge item %r: %s (attempt %d of %d); retrying", req.item, last,
                            attempt + 1, self.max_retries + 1)
                self._sleep(attempt, retry_after)
        raise JudgeError(f"judge item {req.item!r}: {self.url} failed after "
                         f"{self.max_retries + 1} attempts; last error: {last}")

    def _content(self, req: ChatRequest, data: bytes) -> str:
        try:
            reply = json.loads(data)
        except ValueError:
            raise JudgeError(f"judge item {req.item!r}: the reply from {self.url} is not JSON: "
                             f"{_snippet(data)!r}") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(f"judge item {req.item!r}: the reply from {self.url} has no "
                             f"choices[0].message.content string: {_snippet(data)!r}")
        return content

    def _ask_and_accept(self, req: ChatRequest) -> str | JudgeError:
        try:
            return self._accept(req, self._ask(req))
        except JudgeError as e:
            return e

    def _complete(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        if self.max_workers == 1 or len(requests) == 1:
            return [self._ask_and_accept(r) for r in requests]
        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(self._ask_and_accept, requests))


# ------------------------------------------------------------------------------------ local
class LocalChatBackend(CachedBackend):
    """A local judge: a :class:`~sgalm_jax.models.CausalLM` and its tokenizer, through our sampler.

    Requests are rendered with the tokenizer's chat template (generation prompt appended) and
    decoded greedily unless their params say otherwise (``temperature``, ``top_p``, ``max_tokens``
    -> ``max_new_tokens``, default ``max_new_tokens``). At most ``batch_size`` rows decode at once
    (the sampler's ``max_batch_size``: continuous-engine slots when more requests wait); ``seed``
    fixes sampling when the temperature is positive.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "local",
                 max_new_tokens: int = 1024, batch_size: int = 16, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, **sampler_options: Any):
        super().__init__(name, cache_dir)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("judge: the local judge's tokenizer has no chat template")
        self.lm, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.seed = int(max_new_tokens), int(batch_size), seed
        self.sampler_options = sampler_options

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None,
                        **kwargs: Any) -> "LocalChatBackend":
        """Load an HF checkpoint directory (weights and tokenizer) as a judge named by its path."""
        from sgalm_jax.models import load_pretrained, load_tokenizer

        model = load_pretrained(path, dtype=dtype, mesh=mesh)
        kwargs.setdefault("name", os.path.basename(os.path.normpath(os.fspath(path))))
        return cls(model, load_tokenizer(path), mesh=mesh, **kwargs)

    def _complete(self, requests: Sequence[ChatRequest]) -> list[str | JudgeError]:
        import jax

        from sgalm_jax.sampling import generate_text

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = dict(r.params)
            max_new = p.get("max_tokens", p.get("max_completion_tokens", self.max_new_tokens))
            spec = (int(max_new),
                    float(p.get("temperature", 0.0)), p.get("top_p"))
            groups.setdefault(spec, []).append(i)
        out: list[str | None] = [None] * len(requests)
        # One call per group: at most batch_size rows decode at once (the continuous engine's
        # slots, refilled as answers end; the static engine's batches), unless the options say.
        options = dict(self.sampler_options)
        options.setdefault("max_batch_size", self.batch_size)
        for (max_new, temperature, top_p), idx in groups.items():
            gen = generate_text(self.lm, self.tokenizer,
                                [[dict(m) for m in requests[i].messages] for i in idx],
                                max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                rng=jax.random.key(self.seed), **options)
            for i, text in zip(idx, gen.texts):
                out[i] = text
        results: list[str | JudgeError] = []
        for r, text in zip(requests, out):
            try:
                results.append(self._accept(r, text))
            except JudgeError as e:
                results.append(e)
        return results
