"""Scale a real home link down to the lab's small model.

Our CPU peers train a model a thousand times smaller than the ones volunteers
train, so a real 50 Mbit/s uplink would carry their pseudo-gradients in no time and
hide every network problem. The lab keeps what matters instead: the ratio of a
round's compute time to its transfer time.

With N parameters, b bits per parameter sent per round (8 for an 8-bit
pseudo-gradient), a link of r bits per second and compute time C per round::

    transfer time  T = N * b / r
    ratio          rho = C / T

The real case fixes rho_real = C_real / (N_real * b_real / r_real). The lab's link
keeps it: C_lab / (N_lab * b_lab / r_lab) = rho_real, so::

    r_lab = rho_real * N_lab * b_lab / C_lab

and every rate of the real case (its downlink too) is scaled by the same factor
k = r_lab / r_real.

The real case (:data:`CONSUMER_GPU`): a 1B-parameter model on a consumer GPU
computes for about as long per DiLoCo round as its 8-bit pseudo-gradient takes to
cross a 50 Mbit/s uplink: T = 1e9 * 8 / 50e6 = 160 s, C = 160 s, rho = 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RealCase:
    """A real volunteer's round: its model, what it sends, its link and compute time."""

    num_params: float
    bits_per_param: float
    uplink_bps: float
    compute_s_per_round: float

    @property
    def transfer_s_per_round(self) -> float:
        return self.num_params * self.bits_per_param / self.uplink_bps

    @property
    def compute_to_transfer(self) -> float:
        """rho: compute time per round over transfer time per round."""
        return self.compute_s_per_round / self.transfer_s_per_round


CONSUMER_GPU = RealCase(
    num_params=1e9, bits_per_param=8, uplink_bps=50e6, compute_s_per_round=160.0
)
"""1B parameters, 8-bit pseudo-gradient, 50 Mbit/s up; compute as long as transfer."""


def scaled_uplink_bps(
    num_params: float,
    compute_s_per_round: float,
    bits_per_param: float = 8,
    real: RealCase = CONSUMER_GPU,
) -> float:
    """The lab uplink rate (bits/s) at which a round of our model (``num_params``
    parameters, ``compute_s_per_round`` measured seconds of compute per round, sending
    ``bits_per_param`` per parameter) has the real case's compute-to-transfer ratio:
    ``r_lab = rho_real * num_params * bits_per_param / compute_s_per_round``."""
    if num_params <= 0 or compute_s_per_round <= 0:
        raise ValueError("num_params and compute_s_per_round must be positive")
    return real.compute_to_transfer * num_params * bits_per_param / compute_s_per_round


def scale_factor(
    num_params: float,
    compute_s_per_round: float,
    bits_per_param: float = 8,
    real: RealCase = CONSUMER_GPU,
) -> float:
    """k = r_lab / r_real: multiply any rate of the real case (its downlink) by it."""
    return scaled_uplink_bps(num_params, compute_s_per_round, bits_per_param, real) / (
        real.uplink_bps
    )
