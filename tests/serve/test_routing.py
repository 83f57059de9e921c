"""The A/B router on its own: weights, stickiness per user, names that are not routes, zero weights."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneloop.config import RouteConfig
from tuneloop.serve.gateway.routing import Router

DRAWS = 20_000
# Four standard deviations of a share at DRAWS draws is at most 4 * sqrt(0.25 / DRAWS) ≈ 0.014.
TOLERANCE = 0.015


def shares(choices: list[str]) -> dict[str, float]:
    return {variant: count / len(choices) for variant, count in Counter(choices).items()}


def test_weights_are_respected_over_many_draws() -> None:
    router = Router({"extractor": RouteConfig(variants={"champion": 70, "challenger": 20, "canary": 10})}, seed=1)
    observed = shares([router.choose("extractor", None)[0] for _ in range(DRAWS)])
    for variant, expected in {"champion": 0.7, "challenger": 0.2, "canary": 0.1}.items():
        assert observed[variant] == pytest.approx(expected, abs=TOLERANCE), variant


def test_sticky_users_spread_by_weight_and_keep_their_variant() -> None:
    routes = {"extractor": RouteConfig(variants={"champion": 75, "challenger": 25})}
    router = Router(routes, seed=1)
    first = {f"user-{index}": router.choose("extractor", f"user-{index}")[0] for index in range(DRAWS)}
    assert shares(list(first.values()))["challenger"] == pytest.approx(0.25, abs=TOLERANCE)
    again = Router(routes, seed=2)  # another process, another seed: the hash of the user decides, not the seed
    for user in list(first)[:500]:
        assert router.choose("extractor", user)[0] == first[user]
        assert again.choose("extractor", user)[0] == first[user]


def test_same_user_may_get_different_variants_on_different_routes() -> None:
    router = Router(
        {name: RouteConfig(variants={"left": 50, "right": 50}) for name in ("first-route", "second-route")}, seed=0
    )
    users = [f"user-{index}" for index in range(200)]
    differ = [router.choose("first-route", user)[0] != router.choose("second-route", user)[0] for user in users]
    assert 0 < sum(differ) < len(users)  # the route name is part of the hash: splits are independent


def test_not_sticky_ignores_the_user() -> None:
    router = Router({"extractor": RouteConfig(variants={"champion": 50, "challenger": 50}, sticky=False)}, seed=3)
    observed = shares([router.choose("extractor", "always-the-same-user")[0] for _ in range(DRAWS)])
    assert observed["challenger"] == pytest.approx(0.5, abs=TOLERANCE)


def test_request_without_user_on_a_sticky_route_is_drawn_at_random() -> None:
    router = Router({"extractor": RouteConfig(variants={"champion": 50, "challenger": 50})}, seed=4)
    assert set(Counter(router.choose("extractor", None)[0] for _ in range(200))) == {"champion", "challenger"}


def test_names_that_are_not_routes_pass_through_without_variant() -> None:
    router = Router({"extractor": RouteConfig(variants={"champion": 1})})
    assert router.choose("my-base-model", "user-1") == ("my-base-model", None)
    assert router.choose("champion", None) == ("champion", None)  # a variant asked for by name is not a route


def test_route_answers_with_its_variant_name() -> None:
    router = Router({"extractor": RouteConfig(variants={"extractor@champion": 1})})
    assert router.choose("extractor", "user-1") == ("extractor@champion", "extractor@champion")
    assert router.names() == ["extractor"] and router.variants() == {"extractor@champion"}


@pytest.mark.parametrize(
    "variants",
    [
        {"off": 0, "on": 1},
        {"on": 1, "off": 0},
        {"a": 0.1, "b": 0.2, "c": 0.7, "off": 0},
        {"a": 1, "off": 0, "b": 3},
    ],
    ids=["first", "last", "last-after-floats", "middle"],
)
@pytest.mark.parametrize("sticky", [True, False])
def test_zero_weight_variant_is_never_chosen(variants: dict[str, float], sticky: bool) -> None:
    router = Router({"extractor": RouteConfig(variants=variants, sticky=sticky)}, seed=5)
    chosen = {router.choose("extractor", f"user-{index}")[0] for index in range(DRAWS // 4)}
    chosen |= {router.choose("extractor", None)[0] for _ in range(DRAWS // 4)}
    assert "off" not in chosen
    assert chosen == {name for name, weight in variants.items() if weight > 0}
