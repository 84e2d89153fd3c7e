"""The HTTP service of serve.py: POST /api/sentiment with dynamic batching, several classifiers on one base, limits,
health, readiness and Prometheus metrics. Every model call goes through predict.Classifier.

Texts of concurrent requests wait in one queue per loaded model; a worker takes up to `max_batch_size` of them (or what
came within `max_wait_ms`), scores them in one call on a single model thread, and hands each result back to its request.
LoRA checkpoints of the same base share one PeftModel: each is an adapter of it, and one batch may mix them.
"""
import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from pydantic import BaseModel, Field

from . import UserError, repo_relative
from .cli import check_ranges
from .calibration import calibration_of
from .checkpoint import CheckpointError, base_model_of, find_checkpoint, model_name, read_info
from .models import BASE_SETTINGS
from .predict import Classifier, clean_text, fit_to_device, prediction_cut, runtime_options, text_problem

log = logging.getLogger("weibo_senti.serving")
SHARES_BASE = ("lora", "bert_lora")  # methods whose checkpoints are PEFT adapters: one base in memory for all of them
disable_created_metrics()  # no *_created series: they double /metrics for no use here


@dataclass
class Limits:
    max_texts_per_request: int = 256
    max_text_chars: int = 5000
    max_body_bytes: int = 1_000_000
    max_batch_size: int = 128
    forward_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 4096  # texts waiting for the model, over all requests
    request_timeout_s: float = 30.0
    cache_size: int = 10_000


class ServiceError(Exception):
    """An answer other than 200: its status, a short kind (also the metrics label) and a message naming the problem."""

    def __init__(self, status, kind, message, headers=None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def parse_checkpoints(values, default):
    """--checkpoint NAME=PATH (or PATH, named after its method) -> [(name, Path)]; the first is the default model.
    default: a function giving the NAME=PATH to serve when `values` names none."""
    pairs = []
    for value in values or [default()]:
        name, separator, path = str(value).partition("=")
        if not separator:
            path = value
            info_path = find_checkpoint(Path(path)) / "checkpoint.json"
            name = read_info(Path(path))["method"] if info_path.is_file() else Path(path).name
        if not name or not path:
            raise UserError(f"--checkpoint {value}: expected NAME=PATH")
        if name in dict(pairs):
            raise UserError(f"--checkpoint {value}: the name {name!r} is given twice; name each checkpoint NAME=PATH")
        pairs.append((name, Path(path)))
    return pairs


@dataclass
class Served:
    """One name of /api/sentiment's "model": a classifier, and the adapter of it that this name scores with."""

    name: str
    path: Path
    info: dict
    classifier: Classifier
    adapter: str | None  # None: a model of its own
    group: "Batcher" = None
    model_id: str = ""  # what score.py writes in its `model` column: method@digest of the weights

    def describe(self):
        metrics = self.info.get("metrics", {})
        return {
            "name": self.name,
            "model_id": self.model_id,
            "method": self.info.get("method", "plain classifier"),
            "base": self.info.get("base_model"),
            "checkpoint": shown_path(self.path),
            "max_length": self.classifier.max_length,
            "precision": "fp32" if self.classifier.precision == "no" else self.classifier.precision,
            "runs_as": self.classifier.runs_as,
            "bands": (self.info.get("calibration") or {}).get("bands"),  # the five levels' edges, where fitted
            "validation": {
                "accuracy": metrics.get("val_accuracy"),
                "macro_f1": metrics.get("val_macro_f1"),
                "accuracy_without_emoticons": metrics.get("val_no_emoticons_accuracy"),
                "macro_f1_without_emoticons": metrics.get("val_no_emoticons_macro_f1"),
            },
        }


def shown_path(path):
    """A checkpoint's path as the service shows it to clients: relative to the repository where it lies inside it, else
    only its folder's name (an absolute path tells a client about the server's disk)."""
    shown = repo_relative(path)
    return Path(shown).name if Path(shown).is_absolute() else shown


def load_models(checkpoints, runtime):
    """[(name, path)] -> {name: Served}. A LoRA checkpoint whose base (read alike) an earlier one already loaded
    becomes one more adapter of that model (PeftModel.load_adapter) instead of a second copy of the base; one alone on
    its base is merged into it. runtime: Classifier options (mixed_precision, backend)."""
    entries = []
    for name, path in checkpoints:
        folder = find_checkpoint(path)
        info = read_info(folder) if (folder / "checkpoint.json").is_file() else {}
        # only checkpoints that read the same base the same way share it: its layers, its pooling, the texts' prefix
        key = (str(base_model_of(info).resolve()), prediction_cut(info), info.get("text_prefix", ""),
               *(info["method_settings"].get(setting) for setting in BASE_SETTINGS)) if info.get("method") in SHARES_BASE else None
        entries.append((name, path, folder, info, key))
    keys = [key for *_, key in entries]
    served, shared = {}, {}
    for name, path, folder, info, key in entries:
        if key in shared:
            classifier = shared[key]
            adapter = f"served_{len(served)}"  # not the served name: PEFT's adapter names must not hold '.' or be 'default'
            try:
                classifier.model.load_adapter(str(folder), adapter_name=adapter)
            except Exception as error:
                raise CheckpointError(f"{folder}: cannot load it as an adapter of {key[0]} ({type(error).__name__}: {error})") from None
            classifier.adapter_calibrations[adapter] = calibration_of(info)
            served[name] = Served(name, path, info, classifier, adapter=adapter, model_id=model_name(path))
        else:
            # a LoRA checkpoint alone on its base is merged into it (twice as fast on a CPU); one that shares stays a
            # PeftModel, which the later ones join as adapters
            shares = key is not None and keys.count(key) > 1
            classifier = Classifier.load(path, merge_lora=not shares, **runtime)
            if shares:
                shared[key] = classifier
                classifier.adapter_calibrations[classifier.model.active_adapter] = (classifier.temperature, classifier.bias)
            served[name] = Served(
                name, path, info, classifier, adapter=classifier.model.active_adapter if shares else None, model_id=model_name(path))
        log.info("loaded %s: %s; %s", name, classifier.source, classifier.describe_runtime())
    return served


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("weibo_senti_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=r)
        self.texts = Counter("weibo_senti_texts", "texts answered, by model", ["model"], registry=r)
        self.errors = Counter("weibo_senti_errors", "answers other than 200, by kind", ["kind"], registry=r)
        self.batch_size = Histogram(
            "weibo_senti_batch_size", "texts per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.queue_wait = Histogram("weibo_senti_queue_wait_seconds", "time a text waited for its model call", registry=r)
        self.model_time = Histogram("weibo_senti_model_seconds", "time of one model call (a batch)", registry=r)
        self.cache_hits = Counter("weibo_senti_cache_hits", "texts answered from the result cache", registry=r)
        self.cache_misses = Counter("weibo_senti_cache_misses", "texts not in the result cache", registry=r)


class ResultCache:
    """The results of the most recent (model, text) pairs; size 0 turns it off. Used from the event loop only."""

    def __init__(self, size):
        self.size, self.entries = size, OrderedDict()

    def get(self, key):
        result = self.entries.get(key)
        if result is not None:
            self.entries.move_to_end(key)
        return result

    def put(self, key, result):
        if self.size:
            self.entries[key] = result
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


@dataclass
class Pending:
    text: str
    adapter: str | None
    future: asyncio.Future
    cache_key: tuple
    started: bool = False  # taken into a model call: no longer subject to the request's deadline
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """The queue of one loaded model and the task that empties it in batches onto the model thread."""

    def __init__(self, classifier, limits, metrics, model_thread, cache):
        self.classifier, self.limits, self.metrics, self.model_thread, self.cache = classifier, limits, metrics, model_thread, cache
        self.queue = asyncio.Queue()
        self.task = None

    def submit(self, texts, adapter, cache_keys):
        """Queue the texts; their Pending entries, in order."""
        if self.queue.qsize() + len(texts) > self.limits.max_queue:
            raise ServiceError(
                503, "queue_full",
                f"the server is busy: {self.queue.qsize()} texts are waiting and the queue holds {self.limits.max_queue} "
                f"(MAX_QUEUE); retry shortly", headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        entries = [Pending(text, adapter, loop.create_future(), key) for text, key in zip(texts, cache_keys)]
        for entry in entries:
            self.queue.put_nowait(entry)
        return entries

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(batch) < self.limits.max_batch_size:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # their request timed out or went away
            if not batch:
                continue
            now = time.perf_counter()
            for item in batch:
                item.started = True
                self.metrics.queue_wait.observe(now - item.queued_at)
            self.metrics.batch_size.observe(len(batch))
            with self.metrics.model_time.time():
                outcomes = await loop.run_in_executor(self.model_thread, self._score, batch)
            for item, outcome in zip(batch, outcomes):
                if not isinstance(outcome, Exception):
                    self.cache.put(item.cache_key, outcome)  # kept even if its client left: a retry finds it
                if item.future.done():
                    continue
                if isinstance(outcome, Exception):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _score(self, batch):
        """On the model thread. A batch that fails is scored text by text, so one text that breaks the model costs
        only its own request."""
        adapters = [item.adapter for item in batch] if batch[0].adapter is not None else None
        try:
            return self.classifier.predict([item.text for item in batch], self.limits.forward_batch_size, adapters)
        except Exception:
            outcomes = []
            for item in batch:
                try:
                    outcomes.extend(self.classifier.predict([item.text], 1, [item.adapter] if adapters else None))
                except Exception as error:
                    log.exception("model call failed")
                    outcomes.append(ServiceError(500, "model_error", f"the model failed on a text: {type(error).__name__}"))
            return outcomes


class SentimentRequest(BaseModel):
    text: Any = Field(None, description="one text; or give texts", examples=["今天天气真好，心情也很好[哈哈]"])
    texts: Any = Field(None, description="a list of texts, answered in the same order", examples=[["太好吃了[爱你]", "排了两个小时的队[抓狂]"]])
    model: str | None = Field(None, description="a name from GET /api/models; default: the first served")
    clean: bool = Field(False, description="first remove {%...%} tags, @user, 【...】, zero-width characters and emoji")
    per_text_errors: bool = Field(
        False, description="false: one text that cannot be scored (empty, not text, a NUL) fails the "
        "request with 422 naming it; true: that text gets {\"error\": why} in its place in results, the others are "
        "scored, and the answer is 200",
    )


class Result(BaseModel):
    label: int | None = Field(None, description="0 negative, 1 positive")
    sentiment: str | None = None
    confidence: float | None = Field(None, description="the probability of the label given")
    prob_positive: float | None = None
    error: str | None = Field(None, description="only with per_text_errors: why this text was not scored")
    truncated: bool | None = Field(None, description="true: the text was longer than MAX_TEXT_CHARS and its start was scored")


class Summary(BaseModel):
    total: int = Field(description="texts in the request")
    positive: int
    negative: int
    failed: int = Field(0, description="texts not scored (per_text_errors)")
    average_confidence: float | None = Field(None, description="over the scored texts")


class SentimentResponse(BaseModel):
    model: str
    results: list[Result]
    summary: Summary


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it."""

    def __init__(self, app, limit, on_reject):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        body, more = b"", True
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            more = False
            body = None
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()  # counted apart from server errors (count_requests)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                body = None
                break
        if body is None:
            response = self.on_reject(
                ServiceError(413, "body_too_large", f"the request body is over {self.limit:,} bytes (MAX_BODY_BYTES)")
            )
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class ModelPool:
    """Everything between a request's texts and their results: the served models (loaded on a thread once the server
    runs), one Batcher per loaded model on one model thread, and the result cache. No HTTP here."""

    def __init__(self, checkpoints, limits, runtime, metrics, load=load_models):
        self.checkpoints, self.limits, self.runtime, self.metrics, self.load = checkpoints, limits, runtime, metrics, load
        self.models, self.loading_error, self.batchers = None, None, []
        self.cache = ResultCache(limits.cache_size)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # one model call at a time: all cores each

    def start(self, on_load_failure=None):
        """On the event loop: load the models on a thread; once loaded, start their batchers. on_load_failure(error)
        is called on the loop if they cannot be loaded."""
        loop = asyncio.get_running_loop()

        def load_in_thread():
            try:
                models = self.load(self.checkpoints, self.runtime)
            except Exception as error:  # logged here and said by serve.py as it exits; /readyz says only that it failed
                log.error("cannot load the models: %s", error)
                loop.call_soon_threadsafe(self._failed, error, on_load_failure)
                return
            loop.call_soon_threadsafe(self._loaded, models)

        threading.Thread(target=load_in_thread, daemon=True).start()

    def _loaded(self, models):
        batchers = {}
        for served in models.values():
            served.group = batchers.setdefault(
                id(served.classifier), Batcher(served.classifier, self.limits, self.metrics, self.model_thread, self.cache))
        for batcher in batchers.values():
            batcher.task = asyncio.create_task(batcher.run())
        self.batchers, self.models = list(batchers.values()), models
        log.info("ready: %s", ", ".join(models))

    def _failed(self, error, on_load_failure):
        self.loading_error = f"{type(error).__name__}: {error}"
        if on_load_failure is not None:
            on_load_failure(error)

    def stop(self):
        for batcher in self.batchers:
            batcher.task.cancel()
        self.model_thread.shutdown(wait=True)

    def ready(self):
        """The served models by name, the default first; 503 until they are loaded."""
        if self.models is None:
            why = "the models failed to load; the server log says why" if self.loading_error else "the models are still loading"
            raise ServiceError(503, "not_ready", why, headers={"Retry-After": "5"})
        return self.models

    async def results(self, served, texts):
        """predict()'s result for each text, in order: from the cache, or scored in the batches of its model; a text
        the model failed on gets its ServiceError in its place.

        REQUEST_TIMEOUT_S bounds the wait in the queue, not the work: a request none of whose texts has reached the
        model by then gets 504 (and its texts leave the queue); once one has, the request is answered in full, however
        long its texts take on a slow CPU. Results scored for a request that timed out or went away stay in the cache."""
        results = [self.cache.get((served.name, text)) for text in texts]
        missing = [i for i, result in enumerate(results) if result is None]
        self.metrics.cache_hits.inc(len(texts) - len(missing))
        self.metrics.cache_misses.inc(len(missing))
        if missing:
            entries = served.group.submit([texts[i] for i in missing], served.adapter, [(served.name, texts[i]) for i in missing])
            futures = [entry.future for entry in entries]
            try:
                _, waiting = await asyncio.wait(futures, timeout=self.limits.request_timeout_s)
                if waiting and not any(entry.started for entry in entries):
                    raise ServiceError(
                        504, "timeout", f"none of its texts reached the model within {self.limits.request_timeout_s:g} s "
                        "(REQUEST_TIMEOUT_S); the server is overloaded"
                    )
                scored = await asyncio.gather(*futures, return_exceptions=True)
            finally:
                for future in futures:  # a request that ends (timed out, or its client left) takes its texts out of the queue
                    future.cancel()
            for i, result in zip(missing, scored):
                results[i] = result
        self.metrics.texts.labels(served.name).inc(len(texts))
        return results


def field_of(body, i):
    """How an error names the i-th text of a request."""
    return "text" if body.text is not None else f"texts[{i}]"


def texts_of(body, limits):
    """(the texts of a request, checked against the limits and cleaned when it asks for that; {index: why} for those
    that cannot be scored; the indices of those cut to MAX_TEXT_CHARS). Without per_text_errors a ServiceError names
    the first text that cannot be scored instead."""
    if (body.text is None) == (body.texts is None):
        raise ServiceError(422, "invalid_request", 'give either "text" (one string) or "texts" (a list of strings)')
    if body.texts is not None and not isinstance(body.texts, list):
        raise ServiceError(422, "invalid_request", f'"texts" must be a list of strings, not {type(body.texts).__name__}')
    texts = [body.text] if body.text is not None else list(body.texts)
    if len(texts) > limits.max_texts_per_request:
        raise ServiceError(
            413, "too_many_texts",
            f"{len(texts):,} texts in one request; the limit is {limits.max_texts_per_request:,} (MAX_TEXTS_PER_REQUEST)",
        )
    if not texts:
        raise ServiceError(422, "invalid_request", '"texts" is empty: give at least one text')
    problems, cut = {}, set()
    for i, text in enumerate(texts):
        problem = text_problem(text)
        if problem is None and len(text) > limits.max_text_chars:  # the model reads its first few hundred tokens anyway
            texts[i] = text = text[:limits.max_text_chars]
            cut.add(i)
        if problem is None and body.clean and not clean_text(text):
            problem = "empty after cleaning"
        if problem and not body.per_text_errors:
            raise ServiceError(422, "invalid_text", f"{field_of(body, i)}: {problem}")
        if problem:
            problems[i] = f"{field_of(body, i)}: {problem}"
    return [clean_text(text) if body.clean and i not in problems else text for i, text in enumerate(texts)], problems, cut


def create_app(checkpoints, limits=None, runtime=None, load=load_models, on_load_failure=None):
    """The FastAPI app over a ModelPool: routes, error shapes and request metrics. The models load once the server
    runs; until then /readyz and /api/sentiment answer 503. on_load_failure(error): see ModelPool.start."""
    limits = limits or Limits()
    metrics = Metrics()
    pool = ModelPool(checkpoints, limits, runtime or {"mixed_precision": "auto", "backend": "auto"}, metrics, load)

    async def lifespan(app):
        pool.start(on_load_failure)
        yield
        pool.stop()

    # FastAPIOffline: FastAPI whose /docs and /redoc pages load their script and style from this server (the
    # fastapi-offline package), not from a CDN that a server without internet, or behind a firewall, cannot reach
    app = FastAPIOffline(
        title="Weibo sentiment",
        description="Sentiment of Weibo posts (negative / positive) with the classifiers of this toolkit.",
        lifespan=lifespan,
    )
    app.state.draining = False  # set by serve() on SIGTERM: answers still come, each closing its connection

    def error_response(error):
        metrics.errors.labels(error.kind).inc()
        return JSONResponse({"error": error.kind, "detail": error.message}, status_code=error.status, headers=error.headers)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, on_reject=error_response)

    @app.middleware("http")
    async def count_requests(request, call_next):
        try:
            response = await call_next(request)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, and no fault of the server's
            log.debug("client disconnected on %s", request.url.path)
            response = Response(status_code=499)  # nginx's "client closed request", for the metrics alone
        except Exception:  # never a stack trace to the client
            log.exception("unexpected error on %s", request.url.path)
            response = error_response(ServiceError(500, "internal", "internal error; the server log has the details"))
        path = request.url.path if request.url.path in known_paths else "other"  # a bounded set of label values
        metrics.requests.labels(path, str(response.status_code)).inc()
        if app.state.draining:
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request, error):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):  # unknown paths, wrong methods, bodies that are not JSON: the same shape as ours
        kinds = {404: "not_found", 405: "method_not_allowed"}
        detail = error.detail if isinstance(error.detail, str) else "invalid request"
        if error.status_code == 400:  # FastAPI's answer to a body it cannot parse (bad JSON, bad UTF-8, nested too deep)
            return error_response(ServiceError(422, "invalid_request", f"the body is not valid JSON ({detail})"))
        return error_response(ServiceError(error.status_code, kinds.get(error.status_code, "http_error"), detail, error.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'body'}: {problem['msg']}"
            for problem in error.errors()
        )
        return error_response(ServiceError(422, "invalid_request", problems))

    @app.post("/api/sentiment", response_model=SentimentResponse, response_model_exclude_none=True,
              summary="Sentiment of one text or a list of texts")
    async def sentiment(body: SentimentRequest):
        models = pool.ready()
        name = body.model or next(iter(models))
        if name not in models:
            raise ServiceError(404, "unknown_model", f"no model named {name!r}; served: {', '.join(models)}")
        texts, problems, cut = texts_of(body, limits)
        good = [i for i in range(len(texts)) if i not in problems]
        results = [{"error": problems[i]} if i in problems else None for i in range(len(texts))]  # None: filled in below
        for i, result in zip(good, await pool.results(models[name], [texts[i] for i in good])):
            if isinstance(result, ServiceError):
                if not body.per_text_errors:
                    raise result
                result = {"error": f"{field_of(body, i)}: {result.message}"}
            elif i in cut:
                result = {**result, "truncated": True}
            results[i] = result
        scored = [result for result in results if "error" not in result]
        positive = sum(result["label"] for result in scored)
        return {
            "model": name,
            "results": results,
            "summary": {
                "total": len(results),
                "positive": positive,
                "negative": len(scored) - positive,
                "failed": len(results) - len(scored),
                "average_confidence": sum(result["confidence"] for result in scored) / len(scored) if scored else None,
            },
        }

    @app.get("/api/models", summary="The served classifiers, with their validation scores, and the limits of a request")
    async def list_models():
        models = pool.ready()
        described = [served.describe() for served in models.values()]
        for entry, served in zip(described, models.values()):
            entry["default"] = served is next(iter(models.values()))
            entry["shares_base_with"] = [
                other.name for other in models.values() if other is not served and other.classifier is served.classifier
            ]
        return {"models": described, "limits": asdict(limits)}

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Every model is loaded (503 until then)")
    async def readyz():
        if app.state.draining:
            return JSONResponse({"ready": False, "detail": "shutting down"}, status_code=503)
        if pool.models is None:
            return JSONResponse(
                {"ready": False, "detail": "failed to load; the server log says why" if pool.loading_error else "loading"},
                status_code=503, headers={"Retry-After": "5"},
            )
        return {"ready": True, "models": list(pool.models)}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    known_paths = {route.path for route in app.routes}
    return app


def check_checkpoints(checkpoints):
    """Before the server starts: every path is a checkpoint or classifier folder, so a typo fails at once."""
    for name, path in checkpoints:
        folder = find_checkpoint(path)
        if (folder / "checkpoint.json").is_file():
            read_info(folder)
        elif not (folder / "config.json").is_file():
            raise CheckpointError(f"--checkpoint {name}={path}: no checkpoint there (no checkpoint.json or config.json)")


def _at_least(low):
    return lambda v: math.isfinite(v) and v >= low


SETTING_RANGES = {
    "port": (lambda v: 1 <= v <= 65535, "a port from 1 to 65535"),
    **{name: (_at_least(1), "an integer >= 1") for name in (
        "max_texts_per_request", "max_text_chars", "max_body_bytes", "max_batch_size", "forward_batch_size", "max_queue")},
    "max_wait_ms": (_at_least(0), "a number >= 0"),
    "batch_tokens": (_at_least(0), "an integer >= 0 (0: FORWARD_BATCH_SIZE texts a forward pass)"),
    **{name: (lambda v: math.isfinite(v) and v > 0, "a number of seconds > 0") for name in ("request_timeout_s", "request_read_timeout_s")},
    "cache_size": (_at_least(0), "an integer >= 0 (0: no cache)"),
}


def read_deadline_protocol(seconds):
    """uvicorn's h11 protocol with a bound on how long a client may take to send a request's headers and body, counted
    from the connection or from its first byte after the previous answer. uvicorn bounds only the idle wait between
    requests: a client sending a byte every few seconds held its connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    reading = (h11.IDLE, h11.SEND_BODY)  # the client's side of the cycle until its request is complete

    class ReadDeadlineProtocol(H11Protocol):
        read_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            if self.read_deadline is None:
                self._arm()
            super().data_received(data)
            if self.conn.their_state not in reading and self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def connection_lost(self, exc):
            if self.read_deadline is not None:
                self.read_deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            self.read_deadline = self.loop.call_later(seconds, self._too_slow)

        def _too_slow(self):
            self.read_deadline = None
            if self.conn.their_state in reading and not self.transport.is_closing():
                self.transport.close()

    return ReadDeadlineProtocol


def serve(cfg, default_checkpoint):
    """serve.py: the app of create_app() under uvicorn until SIGINT or SIGTERM (which finish the requests in flight).
    default_checkpoint: called for the checkpoint to serve when --checkpoint names none."""
    import uvicorn

    check_ranges(cfg, SETTING_RANGES)
    checkpoints = parse_checkpoints(cfg.checkpoint, default_checkpoint)
    check_checkpoints(checkpoints)
    fitted = fit_to_device(cfg)
    limits = Limits(**{name: getattr(cfg, name) for name in Limits.__dataclass_fields__})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log.info(fitted)
    failure = {}

    def stop_serving(error):
        failure["error"] = error
        server.should_exit = True

    app = create_app(checkpoints, limits, runtime_options(cfg), on_load_failure=stop_serving)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # after the graceful shutdown exit 0, instead of uvicorn re-raising the signal

        async def shutdown(self, sockets=None):
            # Drain before uvicorn's shutdown, which closes idle keep-alive connections at once: a client that sent a
            # request on one just then would get no answer at all. New connections are refused; a request on an open
            # one is answered with "Connection: close"; idle ones are closed after the keep-alive timeout, when they
            # would have been anyway.
            for listener in self.servers:
                listener.close()
            app.state.draining = True
            deadline = time.monotonic() + config.timeout_keep_alive
            while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.request_timeout_s + 5,
                            http=read_deadline_protocol(cfg.request_read_timeout_s))
    server = Server(config)
    server.run()
    if failure:  # a server that cannot serve must not look alive
        raise UserError(f"cannot load the models: {failure['error']}")
