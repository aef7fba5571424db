"""wtacrs.health: non-finite inputs found through device counters, reported once as NonFiniteInputError."""

from __future__ import annotations

import math

import pytest
import torch

import wtacrs
from wtacrs.health import Health


def test_finite_counters_pass_and_a_non_finite_one_is_reported_once_by_name():
    health = Health()
    health.check()  # no counters yet
    health.counter("encoder.layer.0.output.dense", torch.device("cpu")).add_(3.0)
    health.counter("encoder.layer.1.output.dense", torch.device("cpu")).add_(1.0)
    health.check()
    health.counter("encoder.layer.1.output.dense", torch.device("cpu")).add_(math.nan)
    with pytest.raises(wtacrs.NonFiniteInputError, match=r"encoder\.layer\.1\.output\.dense held NaN or Inf"):
        health.check()
    health.check()  # reported once: the counters start again from zero
    health.counter("encoder.layer.0.output.dense", torch.device("cpu")).add_(math.inf)
    with pytest.raises(FloatingPointError, match="encoder.layer.0.output.dense"):
        health.check()


def test_counter_is_made_once_per_name_and_device():
    health = Health()
    first = health.counter("a", torch.device("cpu"))
    assert health.counter("a", torch.device("cpu")) is first
    assert first.shape == () and first.dtype == torch.float32 and float(first) == 0.0
