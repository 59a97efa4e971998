"""What runs in the pods: data pipeline, training engine, objectives, checkpoints, quantization, evaluation."""
