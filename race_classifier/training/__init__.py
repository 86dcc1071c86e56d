"""Training: options (config), what a run reads (run_data), the loop (engine, train), its best/last checkpoints
(checkpoint_saver), its console and CSV report (report), torch.compile (accel), torchrun (distributed),
mixup/CutMix (mixing) and distillation from soft labels (distill). A finished run's best.pt is calibrated and
given its model card by post_training."""


class TrainingError(ValueError):
    """A run that cannot start as asked (nothing to resume, files in the way, another model's checkpoint)."""
