"""The Trainer, LR schedules and throughput metrics."""
