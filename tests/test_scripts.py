"""The diagnostic scripts' pure parts (``scripts/`` is not a package: imported by path)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from wording_probe import probe  # noqa: E402


def test_wording_probe_reads_what_the_features_hold():
    """Goals that the features separate are read right; features without them, at chance."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 3.0
    y_train, y_test = np.repeat(np.arange(8), 20), np.repeat(np.arange(8), 10)
    x_train = centres[y_train] + rng.normal(size=(len(y_train), 16))
    x_test = centres[y_test] + rng.normal(size=(len(y_test), 16))
    linear, nearest = probe(x_train, y_train, x_test, y_test)
    assert linear > 0.95 and nearest > 0.9
    noise = rng.normal(size=x_test.shape)
    linear, nearest = probe(x_train, y_train, noise, y_test)
    assert linear < 0.35 and nearest < 0.35  # chance is 1/8
