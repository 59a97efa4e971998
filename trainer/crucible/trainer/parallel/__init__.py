"""Tensor, pipeline and data-parallel layouts (``training.parallelism``): mesh, Llama stages and TP plan, strategy."""
