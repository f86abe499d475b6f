"""SinkGD paper folder: the token-speedup reading of a validation curve and params validation."""
import math

import pytest
import yaml

from papers.sinkgd.stages import paper, steps_to_target


def test_steps_to_target_interpolates_in_log_perplexity():
    curve = [{"step": 0, "val_ppl": 1000.0}, {"step": 10, "val_ppl": 100.0}, {"step": 20, "val_ppl": 10.0}]
    assert steps_to_target(curve, 100.0) == 10.0
    assert steps_to_target(curve, math.sqrt(1000.0 * 100.0)) == pytest.approx(5.0)
    assert steps_to_target(curve, 2000.0) == 0.0
    assert steps_to_target(curve, 5.0) is None


def test_half_steps_must_be_below_the_full_budget():
    raw = yaml.safe_load(open(paper.package_dir / "params.yaml"))
    raw["half_steps"] = raw["train"]["steps"]
    with pytest.raises(ValueError, match="half_steps"):
        paper.schema(**raw)
    raw["half_steps"], raw["stateless"] = 50, ["nope"]
    with pytest.raises(ValueError, match="nope"):
        paper.schema(**raw)
