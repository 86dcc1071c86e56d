"""Progress off a terminal: long passes (soft labels, evaluation, caches) log lines instead of going silent."""
from __future__ import annotations

import logging

from race_classifier import utils
from race_classifier.utils import progress_bar


def test_progress_bar_logs_about_every_interval_and_at_the_end(monkeypatch, caplog):
    clock = iter([0.0, 10.0, 70.0, 80.0, 140.0, 150.0])  # start, then one reading per item
    monkeypatch.setattr(utils.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="race_classifier.progress"):
        items = list(progress_bar(["a", "b", "c", "d", "e"], "soft labels", every_s=60))
    assert items == ["a", "b", "c", "d", "e"]  # pytest's captured stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["soft labels: 2/5 batch, 0.03 batch/s", "soft labels: 4/5 batch, 0.03 batch/s",
                     "soft labels: 5/5 batch, 0.03 batch/s"]
