"""BettaFish's sentiment analyzer, backed by this toolkit: the interface of InsightEngine/tools/sentiment_analyzer.py
(the same method names, fields and return shapes), so InsightEngine gets our sentiment with no glue.

    from weibo_senti.bettafish import WeiboSentimentAnalyzer
    analyzer = WeiboSentimentAnalyzer(url="http://127.0.0.1:8000")   # a running serve.py; or no url: in this process
    analyzer.initialize()
    analyzer.analyze_query_results(rows, text_field="content", min_confidence=0.8)

Labels are BettaFish's names for our two classes, 负面 and 正面; confidence is the classifier's probability of the
label it gives. A binary confidence is never below 0.5, so min_confidence=0.5 keeps every result: docs/bettafish.md
gives, for each threshold, the share of texts kept and their measured accuracy. With neutral_below=t, a text whose
confidence is under t is labelled 中性: "the classifier cannot tell", not a trained neutral class.
"""
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


NEGATIVE, NEUTRAL, POSITIVE = "负面", "中性", "正面"
TEXT_FIELDS = ("title_or_content", "content", "title", "text")  # tried after text_field, as BettaFish does
PREVIEW_CHARS = 100
PROGRESS_CHUNK = 256  # texts per step of the progress bar


@dataclass
class SentimentResult:
    text: str
    sentiment_label: str
    confidence: float
    probability_distribution: dict
    success: bool = True
    error_message: str | None = None
    analysis_performed: bool = True


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
    checkpoint (default: the one serve.py and score.py use). model: a name from the server's /api/models. retries: of
    a request the server refused for now (503, 504) or lost, before the texts pass through unscored. connect_timeout_s,
    timeout_s: to wait for the server's connection and for each answer; deadline_s: the most one call to the server
    (initialize(), a chunk of PROGRESS_CHUNK texts) takes, retries included."""

    def __init__(self, url=None, checkpoint=None, model=None, neutral_below=None, mixed_precision="auto", batch_size=64, retries=3,
                 connect_timeout_s=5.0, timeout_s=60.0, deadline_s=120.0):
        if neutral_below is not None and not 0.5 <= neutral_below <= 1:
            raise ValueError(f"neutral_below={neutral_below}: a confidence from 0.5 to 1 (a binary label is never less sure than 0.5)")
        self.url, self.checkpoint, self.model, self.neutral_below = url, checkpoint, model, neutral_below
        self.mixed_precision, self.batch_size, self.retries = mixed_precision, batch_size, retries
        self.timeouts = {"connect_timeout_s": connect_timeout_s, "timeout_s": timeout_s, "deadline_s": deadline_s}
        self.client = self.classifier = None
        self.model_id = None
        self.is_initialized, self.is_disabled, self.disable_reason = False, False, None

    def disable(self, reason=None, drop_state=False):
        self.is_disabled, self.disable_reason = True, reason or "sentiment analysis disabled"
        if drop_state:
            self._close()
            self.is_initialized = False

    def enable(self):
        self.is_disabled, self.disable_reason = False, None
        return True

    def initialize(self):
        """Load the classifier, or check that the server answers and serves `model`. False (and disabled, with the
        reason) if that fails; the analyze_* methods then pass the texts through, as BettaFish expects."""
        if self.is_disabled:
            return False
        if self.is_initialized:
            return True
        try:
            if self.url:
                from .client import SentimentClient

                self.client = SentimentClient(self.url, model=self.model, retries=self.retries, **self.timeouts)
                served = self.client.models()["models"]
                chosen = [m for m in served if m["name"] == self.model] if self.model else [m for m in served if m["default"]]
                if not chosen:
                    raise ValueError(f"the server serves no model named {self.model!r}: {', '.join(m['name'] for m in served)}")
                self.model_id = chosen[0]["model_id"]
            else:
                from .checkpoint import model_name
                from .predict import Classifier, default_classifier

                checkpoint = Path(self.checkpoint) if self.checkpoint else default_classifier()[1]
                self.classifier = Classifier.load(checkpoint, mixed_precision=self.mixed_precision)
                self.model_id = model_name(checkpoint)
        except Exception as error:
            self.disable(f"cannot start sentiment analysis: {type(error).__name__}: {error}", drop_state=True)
            return False
        self.is_initialized = True
        return True

    def _close(self):
        if self.client is not None:
            self.client.close()
        self.client = self.classifier = None

    def _result(self, text, scored):
        if "error" in scored:
            return SentimentResult(text, "输入错误", 0.0, {}, success=False, error_message=scored["error"], analysis_performed=False)
        positive = scored["prob_positive"]
        label = POSITIVE if scored["label"] == 1 else NEGATIVE
        if self.neutral_below is not None and scored["confidence"] < self.neutral_below:
            label = NEUTRAL
        return SentimentResult(text, label, scored["confidence"], {NEGATIVE: 1 - positive, POSITIVE: positive})

    def _not_performed(self, texts, reason):
        return [SentimentResult(text, "情感分析未执行", 0.0, {}, success=False, error_message=reason, analysis_performed=False) for text in texts]

    def analyze_batch(self, texts, show_progress=True):
        texts = list(texts)
        if not texts:
            return BatchSentimentResult([], 0, 0, 0, 0.0, analysis_performed=self.is_initialized and not self.is_disabled)
        if self.is_disabled or not self.is_initialized:
            reason = self.disable_reason if self.is_disabled else "not initialized: call initialize() first"
            return BatchSentimentResult(self._not_performed(texts, reason), len(texts), 0, len(texts), 0.0, analysis_performed=False)
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
            }}
        distribution, confident = {}, []
        for result, row in zip(batch.results, rows):
            if not result.success:
                continue
            distribution[result.sentiment_label] = distribution.get(result.sentiment_label, 0) + 1
            if result.confidence >= min_confidence and result.sentiment_label != NEUTRAL:
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
            "sentiment_levels": [NEGATIVE, POSITIVE] if self.neutral_below is None else [NEGATIVE, NEUTRAL, POSITIVE],
            "is_initialized": self.is_initialized,
            "device": str(self.classifier.model.device) if self.classifier is not None else self.url,
        }
