"""The link scaling keeps the real case's compute-to-transfer ratio."""

from __future__ import annotations

import pytest

from lab.scaling import CONSUMER_GPU, RealCase, scale_factor, scaled_uplink_bps


def test_the_real_case_computes_as_long_as_it_transfers() -> None:
    assert CONSUMER_GPU.transfer_s_per_round == pytest.approx(160.0)
    assert CONSUMER_GPU.compute_to_transfer == pytest.approx(1.0)


def test_the_scaled_link_gives_our_model_the_real_ratio() -> None:
    num_params, compute_s = 1.8e6, 2.0
    rate = scaled_uplink_bps(num_params, compute_s)
    assert rate == pytest.approx(7.2e6)  # 1.8e6 parameters x 8 bits in 2 s
    assert compute_s / (num_params * 8 / rate) == pytest.approx(CONSUMER_GPU.compute_to_transfer)
    assert scale_factor(num_params, compute_s) == pytest.approx(7.2e6 / 50e6)


def test_a_real_case_that_computes_longer_allows_a_slower_link() -> None:
    slow = RealCase(num_params=1e9, bits_per_param=8, uplink_bps=50e6, compute_s_per_round=320)
    assert scaled_uplink_bps(1e6, 1.0, real=slow) == pytest.approx(16e6)
    with pytest.raises(ValueError):
        scaled_uplink_bps(1e6, 0.0)
