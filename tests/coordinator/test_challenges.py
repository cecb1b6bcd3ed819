"""Registration challenges: stateless, so no number of them can lock registration."""

import pytest

from crowdtrain.coordinator.api.auth import ChallengeBook
from crowdtrain.protocol.errors import IdentityError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_any_number_of_challenges_leaves_registration_open() -> None:
    book = ChallengeBook()
    for _ in range(100_001):  # the size that once filled the in-memory book for a minute
        book.issue("run")
    book.check(book.issue("run"), "run")
    assert not vars(book).get("_open")  # nothing is kept per challenge


def test_a_challenge_is_good_for_its_run_this_process_and_its_minute() -> None:
    clock = Clock()
    book = ChallengeBook(ttl_s=60.0, clock=clock)
    challenge = book.issue("run")
    assert 16 <= len(challenge) <= 64  # RegisterPayload's bounds
    book.check(challenge, "run")
    book.check(challenge, "run")  # a second registration with it proves as much
    with pytest.raises(IdentityError, match="did not issue"):
        book.check(challenge, "other-run")
    with pytest.raises(IdentityError, match="did not issue"):
        book.check(challenge[:-1] + bytes([challenge[-1] ^ 1]), "run")
    with pytest.raises(IdentityError, match="did not issue"):
        ChallengeBook(clock=clock).check(challenge, "run")  # another process (a restart)
    clock.now += 61.0
    with pytest.raises(IdentityError, match="expired"):
        book.check(challenge, "run")
