"""Data: the DataPipeline stage and the token-shard format shared with the trainer.

- :mod:`.pipeline` — the stage (``python -m crucible.trainer data``), ``run_pipeline(config,
  output_uri) -> Manifest`` and the ``manifest.json`` shape (module docstring);
- :mod:`.step` — the step contract (``Filter.filter(doc) -> reason | None``, ``Modifier``);
- one module per step: :mod:`.normalize`, :mod:`.language`, :mod:`.gopher_repetition`,
  :mod:`.gopher_quality`, :mod:`.c4`, :mod:`.fineweb`, :mod:`.pii`, :mod:`.toxicity`;
- :mod:`.minhash` — vectorized MinHash, LSH buckets, union-find; :mod:`.readers` — sources;
  :mod:`.tokenizer` — BPE training / reuse; :mod:`.shards` — the packed token format;
- :mod:`.synthetic` — a generated corpus with planted defects (tests, benchmark).
"""
