"""A Python client for serve.py that knows the server's limits.

    from weibo_senti.client import SentimentClient
    with SentimentClient("http://127.0.0.1:8000") as client:
        results = client.score(texts)   # one dict per text, in order: label, sentiment, confidence, prob_positive; or error

It reads the server's limits from GET /api/models, splits any number of texts into requests that fit them (count and
bytes), asks for per-text errors so one bad text costs only itself, and retries what is safe to retry (scoring changes
nothing on the server): 503 after its Retry-After, 504, and a request whose connection was dropped under it. What the
server answers is checked, not trusted: one well-formed result per text sent, in order, else those texts get a named
error; an answer that is not the API's JSON is a BadAnswer. Every call ends within deadline_s, retries included.
"""
import email.utils
import json
import math
import time
from contextlib import contextmanager

import httpx

RETRIED_STATUSES = (503, 504)
JSON_OVERHEAD = 64  # bytes of a request body besides its texts: {"texts": [...], "model": ..., "per_text_errors": true}


class ServiceUnavailable(RuntimeError):
    """The server could not be reached, or kept answering 503/504, after every retry. status: the last answer's HTTP
    status (503: up, but loading or too busy), None when it never answered."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class BadAnswer(RuntimeError):
    """The server answered something that is not this API's JSON (an HTML error page, a proxy's answer, a truncation)."""


class RequestRejected(RuntimeError):
    """The server refused a request for a reason retrying cannot fix (4xx): its error kind and detail."""

    def __init__(self, status, kind, detail):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


class SentimentClient:
    """timeout_s: to wait for a connection (connect_timeout_s) and then for each answer; deadline_s: the most one call
    (models(), score()) takes, its retries and waits included (None: no bound beyond the retries)."""

    def __init__(self, url="http://127.0.0.1:8000", model=None, clean=False, timeout_s=300.0, retries=5, max_retry_wait_s=30.0,
                 connect_timeout_s=10.0, deadline_s=None):
        self.url, self.model, self.clean = url.rstrip("/"), model, clean
        self.retries, self.max_retry_wait_s, self.deadline_s = retries, max_retry_wait_s, deadline_s
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        self._limits = None
        self._ends_at = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.http.close()

    def models(self):
        """GET /api/models: the served classifiers (name, model_id, validation scores) and the server's limits."""
        with self._deadline():
            answer = self._call("GET", "/api/models")
        if not isinstance(answer.get("models"), list) or not isinstance(answer.get("limits"), dict):
            raise BadAnswer(f"{self.url}/api/models: the answer lacks 'models' or 'limits': {json.dumps(answer)[:200]}")
        return answer

    @property
    def limits(self):
        if self._limits is None:
            limits = self.models()["limits"]
            for key in ("max_texts_per_request", "max_body_bytes"):
                if isinstance(limits.get(key), bool) or not isinstance(limits.get(key), int) or limits[key] < 1:
                    raise BadAnswer(f"{self.url}/api/models: limits.{key} is {limits.get(key)!r}, not a positive integer")
            self._limits = limits
        return self._limits

    def score(self, texts):
        """One result per text, in order: {label, sentiment, confidence, prob_positive}, or {error} for a text that
        cannot be scored (empty, not text) or whose answer was missing or malformed. A text longer than the server's
        max_text_chars is scored on its start, and its result says "truncated": true (the model reads only its first
        few hundred tokens anyway)."""
        results = []
        with self._deadline():
            most = self.limits.get("max_text_chars")
            texts = list(texts)
            cut = {i for i, text in enumerate(texts) if isinstance(text, str) and isinstance(most, int) and len(text) > most}
            texts = [text[:most] if i in cut else text for i, text in enumerate(texts)]
            for batch in self._batches(texts):
                if isinstance(batch, dict):  # a text too large for any request
                    results.append({"error": f"texts[{len(results)}]: {batch['error']}"})
                    continue
                body = {"texts": batch, "model": self.model, "clean": self.clean, "per_text_errors": True}
                results.extend(self._checked(self._call("POST", "/api/sentiment", json=body), len(batch), len(results)))
        return [{**result, "truncated": True} if i in cut and "error" not in result else result for i, result in enumerate(results)]

    def _checked(self, answer, sent, offset):
        """The answer's results if it holds one well-formed result per text sent; else an error for each text. An error
        names its text by its place in the caller's list (offset: the request's first), not in the request."""
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != sent:
            count = len(results) if isinstance(results, list) else "no"
            return [{"error": f"the server answered {count} results for {sent} texts: none of them is trusted"}] * sent
        checked = []
        for i, one in enumerate(results):
            if not _well_formed(one):
                one = {"error": f"texts[{offset + i}]: the server's result is malformed: {json.dumps(one, ensure_ascii=False)[:120]}"}
            elif "error" in one:
                one = {**one, "error": f"texts[{offset + i}]: {one['error'].removeprefix(f'texts[{i}]: ')}"}
            checked.append(one)
        return checked

    @contextmanager
    def _deadline(self):
        """The deadline of the outermost call in progress (score() calls models() for the limits: one deadline)."""
        owner = self._ends_at is None and self.deadline_s is not None
        if owner:
            self._ends_at = time.monotonic() + self.deadline_s
        try:
            yield
        finally:
            if owner:
                self._ends_at = None

    def _batches(self, texts):
        """Requests within MAX_TEXTS_PER_REQUEST and MAX_BODY_BYTES; a text over the byte limit alone is its own error."""
        most_texts, most_bytes = self.limits["max_texts_per_request"], self.limits["max_body_bytes"] - JSON_OVERHEAD
        batch, size = [], 0
        for text in texts:
            text_bytes = len(json.dumps(text, ensure_ascii=False).encode()) + 2  # the text and its ", "
            if text_bytes > most_bytes:
                if batch:
                    yield batch
                    batch, size = [], 0
                yield {"error": f"{text_bytes:,} bytes as JSON: larger than a request may be ({most_bytes + JSON_OVERHEAD:,}, MAX_BODY_BYTES)"}
                continue
            if batch and (len(batch) == most_texts or size + text_bytes > most_bytes):
                yield batch
                batch, size = [], 0
            batch.append(text)
            size += text_bytes
        if batch:
            yield batch

    def _call(self, method, path, **kwargs):
        problem, wait, status = None, 0.0, None
        for attempt in range(self.retries + 1):
            left = None if self._ends_at is None else self._ends_at - time.monotonic() - wait
            if left is not None and left <= 0:
                raise ServiceUnavailable(f"{self.url}{path}: no answer within the deadline of {self.deadline_s:g} s; last: {problem}", status)
            time.sleep(wait)
            timeout = httpx.USE_CLIENT_DEFAULT if left is None else _shortened(self.http.timeout, left)
            try:
                response = self.http.request(method, path, timeout=timeout, **kwargs)
            except httpx.TransportError as error:  # refused, timed out, or dropped under the request (a restart)
                problem, wait, status = f"{type(error).__name__}: {error}", min(2.0 ** attempt, self.max_retry_wait_s), None
                continue
            if response.status_code in RETRIED_STATUSES:
                problem, status = f"{response.status_code}: {_detail(response)}", response.status_code
                wait = min(retry_after_s(response.headers.get("retry-after"), 2.0 ** attempt), self.max_retry_wait_s)
                continue
            if response.status_code >= 400:
                answer = _json(response) or {}
                raise RequestRejected(response.status_code, answer.get("error", "http_error"), answer.get("detail", response.text[:200]))
            answer = _json(response)
            if answer is None:
                raise BadAnswer(f"{self.url}{path}: answered {response.status_code} with "
                                f"{response.headers.get('content-type', 'no content type')}, not JSON: {response.text[:120]!r}")
            return answer
        raise ServiceUnavailable(f"{self.url}{path}: no answer after {self.retries + 1} tries; last: {problem}", status)


def retry_after_s(value, otherwise):
    """Retry-After (RFC 9110): seconds, or an HTTP date; anything else (negative, nan, garbage) is ignored."""
    if value is None:
        return otherwise
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return otherwise
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else otherwise


def _shortened(timeout, left):
    parts = {name: min(getattr(timeout, name) or left, left) for name in ("connect", "read", "write", "pool")}
    return httpx.Timeout(**parts)


def _well_formed(result):
    if not isinstance(result, dict):
        return False
    if "error" in result:
        return isinstance(result["error"], str)
    numbers = [result.get(key) for key in ("confidence", "prob_positive")]
    return (result.get("label") in (0, 1) and not isinstance(result.get("label"), bool)
            and all(isinstance(n, (int, float)) and not isinstance(n, bool) and 0 <= n <= 1 for n in numbers))


def _json(response):
    """The answer's JSON object, or None when it is not one."""
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _detail(response):
    return (_json(response) or {}).get("detail", response.text[:200])
