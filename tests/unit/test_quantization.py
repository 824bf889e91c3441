"""QLoRA never degrades silently: the decision (workers.quantization) on every machine shape,
and the policy field that allows the plain-LoRA fallback."""

from __future__ import annotations

import pytest

from service.domain.policy import Policy
from workers.quantization import (
    MISSING_BITSANDBYTES,
    MISSING_CUDA,
    decide_quantization,
    plan_quantization,
)


@pytest.mark.parametrize("cuda, bnb", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("fallback", ["fail", "lora"])
def test_no_quantization_is_plain_lora_whatever_the_machine(cuda, bnb, fallback):
    plan = decide_quantization("none", fallback, cuda=cuda, bitsandbytes=bnb)
    assert (plan.used, plan.fallback, plan.failure, plan.missing) == ("none", False, None, ())


@pytest.mark.parametrize("fallback", ["fail", "lora"])
def test_qlora_runs_where_cuda_and_bitsandbytes_are(fallback):
    plan = decide_quantization("qlora", fallback, cuda=True, bitsandbytes=True)
    assert (plan.used, plan.fallback, plan.failure) == ("qlora", False, None)
    assert "NF4" in plan.reason


@pytest.mark.parametrize("cuda, bnb, missing", [
    (False, True, (MISSING_CUDA,)),
    (True, False, (MISSING_BITSANDBYTES,)),
    (False, False, (MISSING_CUDA, MISSING_BITSANDBYTES)),
])
def test_qlora_without_what_it_needs_fails_naming_it_by_default(cuda, bnb, missing):
    plan = decide_quantization("qlora", cuda=cuda, bitsandbytes=bnb)  # default: fail
    assert plan.used is None and not plan.fallback and plan.missing == missing
    for what in missing:
        assert what in plan.failure
    assert "training.quantization_fallback: lora" in plan.failure  # and how to allow LoRA
    assert plan.as_dict()["missing"] == list(missing)


@pytest.mark.parametrize("cuda, bnb, missing", [
    (False, True, (MISSING_CUDA,)),
    (True, False, (MISSING_BITSANDBYTES,)),
    (False, False, (MISSING_CUDA, MISSING_BITSANDBYTES)),
])
def test_qlora_falls_back_to_lora_only_when_the_policy_says_so_and_says_why(cuda, bnb, missing):
    plan = decide_quantization("qlora", "lora", cuda=cuda, bitsandbytes=bnb)
    assert (plan.used, plan.fallback, plan.failure) == ("none", True, None)
    assert plan.missing == missing and all(what in plan.reason for what in missing)
    assert plan.as_dict() == {"requested": "qlora", "used": "none", "fallback": True,
                              "missing": list(missing), "reason": plan.reason}


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="quantization must be"):
        decide_quantization("int8", cuda=True, bitsandbytes=True)
    with pytest.raises(ValueError, match="quantization_fallback must be"):
        decide_quantization("qlora", "maybe", cuda=True, bitsandbytes=True)


def test_this_machine_is_probed():
    import importlib.util

    import torch

    plan = plan_quantization("qlora")
    has_all = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    assert (plan.used == "qlora") == has_all and (plan.failure is None) == has_all


def test_policy_fallback_defaults_to_fail_and_is_validated():
    assert Policy().training.quantization_fallback == "fail"
    p = Policy.model_validate({"training": {"quantization": "qlora", "quantization_fallback": "lora"}})
    assert p.training.quantization_fallback == "lora"
    with pytest.raises(ValueError, match="quantization_fallback"):
        Policy.model_validate({"training": {"quantization": "qlora", "quantization_fallback": "cpu"}})
