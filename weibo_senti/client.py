"""A Python client for serve.py that knows the server's limits.

    from weibo_senti.client import SentimentClient
    with SentimentClient("http://127.0.0.1:8000") as client:
        results = client.score(texts)   # one dict per text, in order: label, sentiment, confidence, prob_positive; or error

It reads the server's limits from GET /api/models, splits any number of texts into requests that fit them (count and
bytes), asks for per-text errors so one bad text costs only itself, and retries what is safe to retry (scoring changes
nothing on the server): 503 after its Retry-After, 504, and a request whose connection was dropped under it.
"""
import json
import time

import httpx

RETRIED_STATUSES = (503, 504)
JSON_OVERHEAD = 64  # bytes of a request body besides its texts: {"texts": [...], "model": ..., "per_text_errors": true}


class ServiceUnavailable(RuntimeError):
    """The server could not be reached, or kept answering 503/504, after every retry."""


class RequestRejected(RuntimeError):
    """The server refused a request for a reason retrying cannot fix (4xx): its error kind and detail."""

    def __init__(self, status, kind, detail):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


class SentimentClient:
    def __init__(self, url="http://127.0.0.1:8000", model=None, clean=False, timeout_s=300.0, retries=5, max_retry_wait_s=30.0):
        self.url, self.model, self.clean = url.rstrip("/"), model, clean
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._limits = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.http.close()

    def models(self):
        """GET /api/models: the served classifiers (name, model_id, validation scores) and the server's limits."""
        return self._call("GET", "/api/models")

    @property
    def limits(self):
        if self._limits is None:
            self._limits = self.models()["limits"]
        return self._limits

    def score(self, texts):
        """One result per text, in order: {label, sentiment, confidence, prob_positive}, or {error} for a text that
        cannot be scored (empty, not text, too long)."""
        results = []
        for batch in self._batches(list(texts)):
            if isinstance(batch, dict):  # a text too large for any request
                results.append(batch)
                continue
            body = {"texts": batch, "model": self.model, "clean": self.clean, "per_text_errors": True}
            results.extend(self._call("POST", "/api/sentiment", json=body)["results"])
        return results

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
        problem, wait = None, 0.0
        for attempt in range(self.retries + 1):
            time.sleep(wait)
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as error:  # refused, or dropped under the request (a restart, a keep-alive race)
                problem, wait = f"{type(error).__name__}: {error}", min(2.0 ** attempt, self.max_retry_wait_s)
                continue
            if response.status_code in RETRIED_STATUSES:
                problem = f"{response.status_code}: {_detail(response)}"
                wait = min(float(response.headers.get("retry-after", 2.0 ** attempt)), self.max_retry_wait_s)
                continue
            if response.status_code >= 400:
                answer = _json(response)
                raise RequestRejected(response.status_code, answer.get("error", "http_error"), answer.get("detail", response.text))
            return response.json()
        raise ServiceUnavailable(f"{self.url}{path}: no answer after {self.retries + 1} tries; last: {problem}")


def _json(response):
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _detail(response):
    return _json(response).get("detail", response.text[:200])
