"""BettaFish's sentiment analyzer, backed by this toolkit: the interface of InsightEngine/tools/sentiment_analyzer.py
(the same method names, fields and return shapes), so InsightEngine gets our sentiment with no glue.

    from weibo_senti.bettafish import WeiboSentimentAnalyzer
    analyzer = WeiboSentimentAnalyzer(url="http://127.0.0.1:8000")   # a running serve.py; or no url: in this process
    analyzer.initialize()
    analyzer.analyze_query_results(rows, text_field="content", min_confidence=0.8)

Labels are BettaFish's five levels (非常负面, 负面, 中性, 正面, 非常正面), read off the classifier's calibrated confidence
by the two edges its checkpoint keeps (fitted on people's labels: calibration.py; DEFAULT_BANDS where it has none);
levels=3 gives 负面 / 中性 / 正面, levels=2 the two classes alone. 中性 is "the classifier cannot tell", not a trained
neutral class. confidence is the classifier's probability of its binary label. A failed start (a server down or still
loading) is tried again on later calls, at most once every retry_start_every_s.
"""
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .calibration import LEVELS, level_of
from .predict import SENTIMENTS

NEGATIVE, NEUTRAL, POSITIVE = SENTIMENTS[0], LEVELS[2], SENTIMENTS[1]
# the edges for a classifier whose checkpoint has none fitted: the shipped default's (docs/bettafish.md)
DEFAULT_BANDS = {"neutral_below": 0.7043, "very_from": 0.8616}
TEXT_FIELDS = ("title_or_content", "content", "title", "text")  # tried after text_field, as BettaFish does
PREVIEW_CHARS = 100
PROGRESS_CHUNK = 256  # texts per step of the progress bar
SWITCHED_OFF = "情感分析功能已在配置中关闭。"  # BettaFish's words when SENTIMENT_ANALYSIS_ENABLED is False
NOT_INITIALIZED = "模型未初始化，请先调用initialize() 方法"


def enabled_by_environment():
    """BettaFish's SENTIMENT_ANALYSIS_ENABLED, where it is set in the environment (false, 0, no, off: switched off)."""
    return os.environ.get("SENTIMENT_ANALYSIS_ENABLED", "true").strip().lower() not in ("false", "0", "no", "off")


@dataclass
class SentimentResult:
    text: str
    sentiment_label: str
    confidence: float
    probability_distribution: dict
    success: bool = True
    error_message: str | None = None
    analysis_performed: bool = True
    truncated: bool = False  # the text was longer than the server takes: its start was scored


@dataclass
class BatchSentimentResult:
    results: list
    total_processed: int
    success_count: int
    failed_count: int
    average_confidence: float
    analysis_performed: bool = True


class WeiboSentimentAnalyzer:
    """url: a serve.py to ask (through weibo_senti.client); without one, the classifier loads in this process from
    checkpoint (default: the one serve.py and score.py use). model: a name from the server's /api/models. levels: 5, 3
    or 2; neutral_below: a confidence under which a text is 中性, instead of the checkpoint's edge. enabled: BettaFish's
    SENTIMENT_ANALYSIS_ENABLED (None: the environment variable of that name, else on). retries: of a request the server
    refused for now (503, 504) or lost, before the texts pass through unscored. connect_timeout_s, timeout_s: to wait
    for the server's connection and for each answer; deadline_s: the most one call to the server (a chunk of
    PROGRESS_CHUNK texts) takes, retries included; load_wait_s: how long initialize() waits for a server that is up
    but still loading its models (503); retry_start_every_s: after a failed start, how often a later call tries again."""

    def __init__(self, url=None, checkpoint=None, model=None, neutral_below=None, mixed_precision="auto", batch_size=64, retries=3,
                 connect_timeout_s=5.0, timeout_s=60.0, deadline_s=120.0, levels=5, enabled=None, load_wait_s=120.0,
                 retry_start_every_s=30.0):
        if neutral_below is not None and not 0.5 <= neutral_below <= 1:
            raise ValueError(f"neutral_below={neutral_below}: a confidence from 0.5 to 1 (a binary label is never less sure than 0.5)")
        if levels not in (2, 3, 5):
            raise ValueError(f"levels={levels}: 5 (非常负面 ... 非常正面), 3 (负面, 中性, 正面) or 2 (负面, 正面)")
        self.url, self.checkpoint, self.model, self.neutral_below, self.levels = url, checkpoint, model, neutral_below, levels
        self.mixed_precision, self.batch_size, self.retries = mixed_precision, batch_size, retries
        self.timeouts = {"connect_timeout_s": connect_timeout_s, "timeout_s": timeout_s, "deadline_s": deadline_s}
        self.load_wait_s, self.retry_start_every_s = load_wait_s, retry_start_every_s
        self.switched_on = enabled_by_environment() if enabled is None else bool(enabled)
        self.client = self.classifier = None
        self.model_id, self.bands = None, None
        self.is_initialized, self.is_disabled, self.disable_reason = False, False, None
        self.start_failed_at = None  # when a start failed (it is tried again), or None
        if not self.switched_on:
            self.disable(SWITCHED_OFF)

    def disable(self, reason=None, drop_state=False):
        self.is_disabled, self.disable_reason = True, reason or "sentiment analysis disabled"
        self.start_failed_at = None  # disabled on purpose: not tried again by itself
        if drop_state:
            self._close()
            self.is_initialized = False

    def enable(self):
        if not self.switched_on:
            self.disable(SWITCHED_OFF)
            return False
        self.is_disabled, self.disable_reason = False, None
        return True

    def initialize(self):
        """Load the classifier, or check that the server answers and serves `model` (waiting up to load_wait_s while it
        loads). False (and disabled, with the reason) if that fails; the analyze_* methods then pass the texts through,
        as BettaFish expects, and try to start again at most once every retry_start_every_s."""
        if self.is_disabled and self.start_failed_at is None:
            return False
        if self.is_initialized:
            return True
        if self.start_failed_at is not None and time.monotonic() - self.start_failed_at < self.retry_start_every_s:
            return False
        try:
            if self.url:
                self._connect()
            else:
                from .checkpoint import model_name, read_info
                from .predict import Classifier, default_classifier

                checkpoint = Path(self.checkpoint) if self.checkpoint else default_classifier()[1]
                self.classifier = Classifier.load(checkpoint, mixed_precision=self.mixed_precision)
                self.model_id = model_name(checkpoint)
                info = read_info(checkpoint) if (Path(checkpoint) / "checkpoint.json").is_file() else {}
                self.bands = self._edges((info.get("calibration") or {}).get("bands"))
        except Exception as error:
            self.disable(f"cannot start sentiment analysis: {type(error).__name__}: {error}", drop_state=True)
            self.start_failed_at = time.monotonic()
            return False
        self.is_initialized, self.is_disabled, self.disable_reason, self.start_failed_at = True, False, None, None
        return True

    def _connect(self):
        from .client import ServiceUnavailable, SentimentClient

        self.client = SentimentClient(self.url, model=self.model, retries=self.retries, **self.timeouts)
        waiting_until = time.monotonic() + self.load_wait_s
        while True:
            try:
                served = self.client.models()["models"]
                break
            except ServiceUnavailable as error:  # up but loading (503): wait; down: fail now, try again later
                if error.status != 503 or time.monotonic() > waiting_until:
                    raise
                time.sleep(1.0)
        chosen = [m for m in served if m["name"] == self.model] if self.model else [m for m in served if m.get("default")]
        if not chosen:
            raise ValueError(f"the server serves no model named {self.model!r}: {', '.join(m['name'] for m in served)}")
        self.model_id, self.bands = chosen[0]["model_id"], self._edges(chosen[0].get("bands"))

    def _close(self):
        if self.client is not None:
            self.client.close()
        self.client = self.classifier = None

    def _edges(self, model_bands):
        """The edges the levels are read with, once per start: the model's own (else the defaults), neutral_below over them."""
        bands = {**DEFAULT_BANDS, **{k: v for k, v in (model_bands or {}).items() if k in DEFAULT_BANDS}}
        if self.neutral_below is not None:
            bands["neutral_below"] = self.neutral_below
            bands["very_from"] = max(bands["very_from"], self.neutral_below)
        return bands

    def _label(self, label, confidence):
        bands = self.bands
        if self.levels == 2:
            return POSITIVE if label == 1 else NEGATIVE
        if self.levels == 3:
            return NEUTRAL if confidence < bands["neutral_below"] else POSITIVE if label == 1 else NEGATIVE
        return level_of(label, confidence, bands)

    def _result(self, text, scored):
        if "error" in scored:
            return SentimentResult(text, "输入错误", 0.0, {}, success=False, error_message=scored["error"], analysis_performed=False)
        positive = scored["prob_positive"]
        return SentimentResult(text, self._label(scored["label"], scored["confidence"]), scored["confidence"],
                               {NEGATIVE: 1 - positive, POSITIVE: positive}, truncated=bool(scored.get("truncated")))

    def _not_performed(self, texts, reason, label="情感分析未执行"):
        return [SentimentResult(text, label, 0.0, {}, success=False, error_message=reason, analysis_performed=False) for text in texts]

    def analyze_batch(self, texts, show_progress=True):
        texts = list(texts)
        if self.start_failed_at is not None:
            self.initialize()  # a failed start, tried again at a bounded rate
        if not texts:
            return BatchSentimentResult([], 0, 0, 0, 0.0, analysis_performed=self.is_initialized and not self.is_disabled)
        if self.is_disabled:
            return BatchSentimentResult(self._not_performed(texts, self.disable_reason), len(texts), 0, len(texts), 0.0, analysis_performed=False)
        if not self.is_initialized:
            return BatchSentimentResult(self._not_performed(texts, NOT_INITIALIZED, "未初始化"), len(texts), 0, len(texts), 0.0,
                                        analysis_performed=False)
        cleaned = [" ".join(text.split()) if isinstance(text, str) else text for text in texts]
        scored = []
        try:
            chunks = range(0, len(cleaned), PROGRESS_CHUNK)
            for start in tqdm(chunks, desc="sentiment", unit="chunk", disable=not show_progress or len(cleaned) <= PROGRESS_CHUNK):
                chunk = cleaned[start:start + PROGRESS_CHUNK]
                answered = self.client.score(chunk) if self.client else self.classifier.predict_each(chunk, self.batch_size)
                if len(answered) != len(chunk):
                    raise RuntimeError(f"{len(answered)} results for {len(chunk)} texts")
                scored.extend(answered)
        except Exception as error:  # the service went away mid-run: BettaFish goes on without sentiment
            reason = f"sentiment analysis failed: {type(error).__name__}: {error}"
            return BatchSentimentResult(self._not_performed(texts, reason), len(texts), 0, len(texts), 0.0, analysis_performed=False)
        results = [self._result(text, one) for text, one in zip(texts, scored)]
        succeeded = [result for result in results if result.success]
        average = sum(result.confidence for result in succeeded) / len(succeeded) if succeeded else 0.0
        return BatchSentimentResult(results, len(results), len(succeeded), len(results) - len(succeeded), average)

    def analyze_single_text(self, text):
        return self.analyze_batch([text], show_progress=False).results[0]

    def analyze_query_results(self, query_results, text_field="content", min_confidence=0.5):
        """Rows of a MediaCrawler query (dicts): the text from text_field, else title_or_content, content, title, text;
        rows without one are left out. Returns {"sentiment_analysis": {...}} in BettaFish's shape."""
        texts, rows = [], []
        for row in query_results or []:
            text = next((str(row[name]) for name in (text_field, *TEXT_FIELDS) if row.get(name)), "")
            if text.strip():
                texts.append(text)
                rows.append(row)
        if not texts:
            summary = "没有内容需要分析" if not query_results else "查询结果中没有找到可分析的文本内容"
            return {"sentiment_analysis": {"total_analyzed": 0, "sentiment_distribution": {}, "high_confidence_results": [], "summary": summary}}
        batch = self.analyze_batch(texts)
        if not batch.analysis_performed:
            reason = next((r.error_message for r in batch.results if r.error_message), None) or self.disable_reason or "unavailable"
            return {"sentiment_analysis": {
                "available": False, "reason": reason, "total_analyzed": 0, "success_rate": f"0/{len(texts)}",
                "average_confidence": 0.0, "sentiment_distribution": {}, "high_confidence_results": [],
                "summary": f"情感分析未执行：{reason}", "original_texts": rows, "passthrough_texts": texts,
                "results": [asdict(result) for result in batch.results],
            }}
        distribution, confident = {}, []
        for result, row in zip(batch.results, rows):
            if not result.success:
                continue
            distribution[result.sentiment_label] = distribution.get(result.sentiment_label, 0) + 1
            if result.confidence >= min_confidence:  # 中性 included, as BettaFish's analyzer does
                preview = result.text[:PREVIEW_CHARS] + "..." if len(result.text) > PREVIEW_CHARS else result.text
                confident.append({"original_data": row, "sentiment": result.sentiment_label, "confidence": result.confidence, "text_preview": preview})
        if batch.success_count:
            label, count = max(distribution.items(), key=lambda item: item[1])
            summary = f"共分析{batch.success_count}条内容，主要情感倾向为'{label}'({count}条，占{count / batch.success_count * 100:.1f}%)"
        else:
            summary = "情感分析失败"
        return {"sentiment_analysis": {
            "total_analyzed": batch.success_count,
            "success_rate": f"{batch.success_count}/{batch.total_processed}",
            "average_confidence": round(batch.average_confidence, 4),
            "sentiment_distribution": distribution,
            "high_confidence_results": confident,
            "summary": summary,
        }}

    def get_model_info(self):
        return {
            "model_name": self.model_id,
            "served_by": self.url or "this process",
            "supported_languages": ["中文"],
            "sentiment_levels": {5: list(LEVELS), 3: [NEGATIVE, NEUTRAL, POSITIVE], 2: [NEGATIVE, POSITIVE]}[self.levels],
            "is_initialized": self.is_initialized,
            "device": str(self.classifier.model.device) if self.classifier is not None else self.url or "未设置",
        }


BETTAFISH_DATABASE = "bettafish"  # score.py --input / --output: the database BettaFish's own settings name


def bettafish_database_url(environ=None):
    """The database URL BettaFish builds from its settings (InsightEngine/utils/db.py): DATABASE_URL, else DB_DIALECT
    (mysql or postgresql), DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME, from the environment (as BettaFish's .env
    sets them)."""
    from urllib.parse import quote_plus

    from . import UserError

    environ = os.environ if environ is None else environ
    if environ.get("DATABASE_URL"):
        return environ["DATABASE_URL"]
    missing = [name for name in ("DB_HOST", "DB_USER", "DB_NAME") if not environ.get(name)]
    if missing:
        raise UserError(f"--input {BETTAFISH_DATABASE}: BettaFish's database settings are not in the environment ({', '.join(missing)} "
                        "unset): export DATABASE_URL, or DB_DIALECT, DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME "
                        "(set -a; . /path/to/BettaFish/.env; set +a)")
    dialect = environ.get("DB_DIALECT", "mysql").lower()
    driver = "postgresql+asyncpg" if dialect in ("postgresql", "postgres") else "mysql+aiomysql"
    port = f":{environ['DB_PORT']}" if environ.get("DB_PORT") else ""
    return (f"{driver}://{environ['DB_USER']}:{quote_plus(environ.get('DB_PASSWORD', ''))}@{environ['DB_HOST']}{port}/"
            f"{environ['DB_NAME']}")
