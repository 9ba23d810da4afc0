"""Evaluation: caption metrics, model evaluation on VQA-X style items, and the promotion gate.

- ``metrics``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), critic acceptance, answer
  accuracy;
- ``evaluate``: greedy answers, a greedy rationale and n sampled candidates per item, scored
  against gold explanations and by critics (``illume eval`` and the in-process loop);
- ``gate``: scores a candidate adapter and production on the same held-out generations (and any
  curated set) and decides whether the candidate may be promoted.

Plain Python (no Ray); the tuning job calls the gate.
"""
