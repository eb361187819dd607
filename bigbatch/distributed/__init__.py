"""Everything between processes: process-group setup, all-reduce algorithms, DDP hooks, benchmarks."""
