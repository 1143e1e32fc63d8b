"""The body budget: what one request takes, gives back early, and leaves on its way out."""

from __future__ import annotations

import pytest

from stage_service.errors import Overloaded
from stage_service.limits import BodyBudget


def test_a_request_gives_back_early_what_it_no_longer_holds_and_the_rest_on_exit() -> None:
    budget = BodyBudget("s", limit=100)
    with budget.account() as take:
        take(60)
        with pytest.raises(Overloaded, match="holds 60 bytes of request bodies"):
            take(50)
        assert budget.used == 60  # a refused take holds nothing
        take.give_back(40)  # e.g. a compressed body once inflated
        take(70)
        assert budget.used == 90
        take.give_back(1000)  # never more than it took
        assert budget.used == 0
        take(5)
    assert budget.used == 0
