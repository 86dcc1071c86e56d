#!/usr/bin/env python
"""Evaluate a model (same as `race-classifier evaluate`; with --baseline_path, `compare`).

    python evaluation.py --root_dir R --model_path M --output_csv O.csv --output_html O.html
"""
import sys

from race_classifier.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
