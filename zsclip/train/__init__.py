"""Training: the loop and its set-up, data (pairs files, tar shards, batching), the contrastive loss,
accumulation, distributed helpers, state on disk, the run report, BPE learning and the shapes world."""
