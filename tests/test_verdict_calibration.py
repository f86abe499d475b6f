"""The engine's tests are calibrated: under simulated null data (two methods that do not differ, measured on the same
cases) each decides a winner in ≤ 5% of trials, plus Monte-Carlo error, at every n the suite uses; they still have
power at a stated effect; and the rule they replaced did not (the BCa bootstrap at n = 3)."""
import math

import numpy as np
import pytest

from shared.calibration import (NS, _binary_pairs, _pairs, bootstrap_decisive, calibration_rows, engine_decisive,
                                power_rows)

TRIALS = 1000


@pytest.fixture(scope="module")
def rows():
    return calibration_rows(trials=TRIALS, before=False)


def test_every_null_family_and_n_is_at_most_five_percent(rows):
    assert {r["n"] for r in rows} == set(NS)
    assert len({r["null"] for r in rows}) == 6          # normal, skewed, heavy-tailed, binary ties, 2 boundary NIs
    for r in rows:
        se = math.sqrt(0.05 * 0.95 / r["trials"])
        assert r["engine"] <= 0.05 + 3 * se, r          # 3 Monte-Carlo standard errors above nominal


def test_below_six_informative_pairs_nothing_is_ever_decided(rows):
    assert all(r["engine"] == 0.0 for r in rows if r["n"] <= 5 and not r["null"].startswith("boundary"))


def test_power_at_the_stated_effects():
    pw = {(r["effect"].split(",")[0], r["n"]): r["power"] for r in power_rows(trials=400)}
    assert pw[("normal", 20)] > 0.6 and pw[("normal", 50)] > 0.95
    assert pw[("binary", 50)] > 0.8
    assert pw[("normal", 3)] == 0.0                     # honest: n = 3 cannot decide at 5%


def test_the_replaced_bootstrap_rule_was_miscalibrated_at_small_n():
    rng = np.random.default_rng(0)
    a, b = _pairs("normal", 3, 200, rng)
    assert bootstrap_decisive(a, b).mean() > 0.15       # the issue measured 29% at n = 3
    assert engine_decisive(a, b).mean() == 0.0


def test_binary_simulation_is_what_it_says():
    d = _binary_pairs(10_000, 1, np.random.default_rng(0), 0.3, 0.05)
    assert abs((d > 0).mean() - 0.3) < 0.02 and abs((d < 0).mean() - 0.05) < 0.01
