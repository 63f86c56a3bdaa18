"""Knowledge distillation as pure torch (no Ray): soft-label math, the KD and CE losses, batches,
the student builder and held-out evaluation. Components take plain typed arguments, never the
config."""
