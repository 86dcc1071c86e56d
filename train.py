#!/usr/bin/env python
"""Train a face race classifier (same as `race-classifier train`).

    python train.py --dataset D --checkpoint_dir C --log_file L --train_txt T --val_txt V [-c config.yaml]
"""
import sys

from race_classifier.training.train import main

if __name__ == "__main__":
    sys.exit(main())
