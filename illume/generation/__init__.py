"""Generation: ILLUME's prompts and the candidate-rationale sampler.

- ``prompts``: the faithful prompts (``Q: {question} A:`` and ``Q: {question} A: {answer}, seeing
  that``) and answer clean-up;
- ``generator``: ``Generator`` answers (greedily, when no answer is given) and samples n candidate
  rationales per request over several temperatures, a batch of requests at a time, with a
  per-candidate seed and an optional LoRA adapter per request.

Plain Python and torch (no Ray); ``services.generator`` batches requests into it.
"""
