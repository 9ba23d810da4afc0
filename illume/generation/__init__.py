"""Generation: ILLUME's prompts, per-row sampling, the engine boundary and the batched Generator.

- ``prompts``: the faithful prompts (``Q: {question} A:`` and ``Q: {question} A: {answer}, seeing
  that``) and answer clean-up;
- ``sampling``: ``RowSpec`` and ``RowSampler`` (top-k, temperature, top-p, one random generator per
  candidate row), ``candidate_seed``, ``top_k_count``;
- ``engine``: the ``Engine`` protocol the Generator calls (prefill prompts, decode rows, yield each
  finished row) and its data types;
- ``hf_engine``: the Hugging Face engines: ``ForkEngine`` (one prefill per request, shared by the
  answer and rationale steps and forked to the candidates) and ``RepeatedRowsEngine`` (every row
  encodes its whole prompt);
- ``generator``: ``Generator`` answers (greedily, when no answer is given) and samples n candidate
  rationales per request over several temperatures, a batch of requests at a time, with a
  per-candidate seed and an optional LoRA adapter per request.

Plain Python and torch (no Ray); ``services.generator`` batches requests into it.
"""
