"""What runs in the pods: data pipeline, training engine, objectives, checkpoints, quantization, evaluation."""

IMPORTS_DONE_AT: float | None = None
"""When ``python -m crucible.trainer`` had imported its stage module (time.time()); the engine
reports it with the attempt's start (``metrics.jsonl`` event ``attempt``) to time restarts."""
