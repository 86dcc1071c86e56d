"""Training: options (config), what a run reads (run_data), devices and precision (accel), the loop (engine,
train), its outputs (report, finalize) and last-layer refits (rebalance)."""


class TrainingError(ValueError):
    """A run that cannot start as asked (nothing to resume, files in the way, another model's checkpoint)."""
