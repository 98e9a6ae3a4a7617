"""moelab.dist: expert parallelism over torch.distributed (the expert-parallelism slice)."""
