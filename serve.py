"""Serve Weibo sentiment over HTTP: POST /api/sentiment, GET /api/models, /healthz, /readyz, /metrics, docs at /docs.

python serve.py                                  # the default classifier on http://127.0.0.1:8000
python serve.py --checkpoint a=bert_lora/output/best --checkpoint b=models/classifiers/bert_lora
curl -s localhost:8000/api/sentiment -H 'content-type: application/json' -d '{"text": "今天心情很好[哈哈]"}'

Texts of concurrent requests are scored together in batches; LoRA checkpoints of one base share it in memory.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weibo_senti import cli, serving  # noqa: E402
from weibo_senti.predict import default_classifier  # noqa: E402

CHECKPOINT = []  # NAME=PATH of a checkpoint to serve, repeatable; the first is the default (none: adapter_tuning's, trained or shipped: the best measured)
HOST = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
PORT = 8000  # port to listen on
MIXED_PRECISION = "auto"  # auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16 or fp16 (CUDA only)
BACKEND = "auto"  # torch, onnx (ONNX Runtime fp32), onnx-int8, or auto: PyTorch on a GPU or a bf16 CPU, else ONNX Runtime (int8 only if it keeps fp32's labels)
MAX_BATCH_SIZE = 128  # most texts taken from the queue at once; sorted by length, then scored FORWARD_BATCH_SIZE at a time (on a GPU, when not given: 4096)
FORWARD_BATCH_SIZE = 16  # texts per forward pass (on 2 CPU cores e5-small scored 64 mixed texts 1.6x faster as 4 sorted passes of 16)
BATCH_TOKENS = 0  # > 0: a forward pass takes as many length-sorted texts as fit in this many padded tokens, instead of FORWARD_BATCH_SIZE texts (on a GPU, when not given: 65536)
MAX_WAIT_MS = 5.0  # how long a model call waits for more texts to fill its batch
MAX_QUEUE = 4096  # most texts waiting for the model; beyond it requests get 503 with Retry-After (on a GPU, when not given: 65536)
REQUEST_TIMEOUT_S = 30.0  # a request not answered within this gets 504
REQUEST_READ_TIMEOUT_S = 30.0  # a client that takes longer to send a request's headers and body is disconnected
MAX_TEXTS_PER_REQUEST = 256  # more texts in one request: 413
MAX_TEXT_CHARS = 5000  # a longer text is scored on its first MAX_TEXT_CHARS characters, its result says "truncated": true (the model reads its first 512 tokens at most)
MAX_BODY_BYTES = 1_000_000  # a larger request body: 413
CACHE_SIZE = 10_000  # results of recent (model, text) pairs kept for repeats (0: no cache)
LOG_LEVEL = "info"  # uvicorn's log level: debug, info, warning, error

if __name__ == "__main__":
    cli.main(lambda: serving.serve(cli.parse_config(globals()), lambda: "=".join(map(str, default_classifier()))))
