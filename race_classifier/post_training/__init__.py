"""Changing a trained model file: calibration and abstention (calibrate), its model card (model_card),
last-layer refits and recall offsets (rebalance), coarser classes (merge_classes) and ensembles (ensemble).
Each writes a new or updated checkpoint, recalibrated, with a model card beside it. Their flags: options."""
