"""Evaluation: embed an evaluation set once, then retrieval Recall@K and zero-shot accuracy.

    emb = embed_eval_set(model, tokenizer, sources, max_items=1000)
    metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
    metrics |= evaluate_zeroshot(model, tokenizer, sources, task=("shape", "colour"), embeddings=emb)

    metrics |= temporal_metrics(emb)  # clips of the synthetic video world

`evaluate_retrieval` / `evaluate_zeroshot` without `embeddings` and `evaluate_temporal` do the
embedding pass themselves.
"""

from vlpt.eval.embed import EvalEmbeddings, embed_eval_set, encode_captions
from vlpt.eval.retrieval import evaluate_retrieval, retrieval_metrics
from vlpt.eval.temporal import evaluate_temporal, temporal_metrics
from vlpt.eval.zeroshot import (
    TASKS,
    evaluate_zeroshot,
    synthetic_task_labels,
    zeroshot_metrics,
)

__all__ = [
    "TASKS",
    "EvalEmbeddings",
    "embed_eval_set",
    "encode_captions",
    "evaluate_retrieval",
    "evaluate_temporal",
    "evaluate_zeroshot",
    "retrieval_metrics",
    "synthetic_task_labels",
    "temporal_metrics",
    "zeroshot_metrics",
]
