"""plait-bench: an nccl-tests style microbenchmark for torch.distributed backends (``python -m plait.bench``)."""
