"""Data: the DataPipeline steps and the token-shard format shared with the trainer."""
