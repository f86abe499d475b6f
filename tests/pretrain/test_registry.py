"""Generic rules every registered optimizer must satisfy (picked up from the registry: a new optimizer is tested
here with no edit): it loads lazily as a HarnessOptimizer, measured state bytes equal its own formula, the same
seed gives the same run, and each of its declared bad values raises ValueError naming the value."""
import re

import pytest
import torch

from optim_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from optim_helpers import assert_same_params, batches, tiny_model, train
from shared.pretrain.groups import param_groups
from shared.pretrain.optim import (OPTIMIZERS, HarnessOptimizer, analytic_state_bytes, build_optimizer,
                                   optimizer_class, state_bytes)

NAMES = sorted(OPTIMIZERS)




@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_a_harness_optimizer(name):
    cls = optimizer_class(name)
    assert issubclass(cls, HarnessOptimizer) and issubclass(cls, torch.optim.Optimizer)
    assert cls.invalid_examples, f"{name} declares no invalid option value for the generic validation test"
    assert set(cls.invalid_examples) <= set(cls.group_options) | set(cls.ctor_options)


@pytest.mark.parametrize("name", NAMES)
def test_measured_state_bytes_equal_the_class_formula(name):
    model = tiny_model()
    opt = build_optimizer(name, model, lr=1e-3)
    train(model, opt, batches(3))
    groups = param_groups(model)
    assert state_bytes(opt, groups) == analytic_state_bytes(name, model)
    assert state_bytes(opt) == state_bytes(opt, groups)        # the optimizer's own role tags agree


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_the_same_run(name):
    runs = []
    for _ in range(2):
        model = tiny_model(seed=3)
        train(model, build_optimizer(name, model, lr=1e-3, weight_decay=0.01), batches(4, seed=5))
        runs.append(model)
    assert_same_params(*runs, rtol=0, atol=0)
    assert any((p != q).any() for p, q in zip(runs[0].parameters(), tiny_model(seed=3).parameters()))


@pytest.mark.parametrize("name,option,bad", [(n, k, v) for n in NAMES
                                             for k, v in optimizer_class(n).invalid_examples.items()])
def test_bad_values_raise_naming_the_value(name, option, bad):
    model = tiny_model()
    pattern = re.escape(repr(bad)) if isinstance(bad, str) else re.escape(str(bad))
    with pytest.raises(ValueError, match=pattern):
        build_optimizer(name, model, lr=1e-3, **{option: bad})
    with pytest.raises(ValueError, match=pattern):
        analytic_state_bytes(name, model, **{option: bad})


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name):
    with pytest.raises(ValueError, match="not_an_option"):
        build_optimizer(name, tiny_model(), lr=1e-3, not_an_option=1)


def test_unknown_optimizer_lists_the_registry():
    with pytest.raises(ValueError, match="'sgdx'.*adamw"):
        optimizer_class("sgdx")
