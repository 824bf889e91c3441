"""Whether a training can use the quantization its policy asks for, decided before it starts.

QLoRA (4-bit NF4 base weights through bitsandbytes) needs a CUDA GPU and bitsandbytes. Where
either is missing a `qlora` policy fails the run, naming what is missing, unless the policy says
`quantization_fallback: lora`: then plain LoRA trains and the run records the fallback (its
metrics' "quantization" entry, which the CLI and the ops page show). Nothing degrades silently.

`decide_quantization` is the pure decision; `plan_quantization` feeds it what this machine has.
No torch import at module level: the API process may import this module.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

QUANTIZATIONS = ("none", "qlora")
FALLBACKS = ("fail", "lora")  # what a qlora policy does where QLoRA cannot run

MISSING_CUDA = "CUDA is not available (torch sees no GPU)"
MISSING_BITSANDBYTES = "bitsandbytes is not installed (pip install -e '.[gpu]')"


class QuantizationUnavailable(RuntimeError):
    """The requested quantization cannot run here and the policy allows no fallback."""


@dataclass(frozen=True)
class QuantizationPlan:
    """What a training will do about its requested quantization.

    used: "qlora" or "none" (plain LoRA), or None when the run must fail (`failure` says why).
    fallback: True when qlora was asked for and plain LoRA trains because the policy allows it.
    missing: what this machine lacks for the request (empty when it has everything).
    """

    requested: str
    used: str | None
    fallback: bool
    missing: tuple[str, ...]
    reason: str | None

    @property
    def failure(self) -> str | None:
        return self.reason if self.used is None else None

    def as_dict(self) -> dict[str, Any]:
        """JSON for the run row's metrics["quantization"] (what the CLI and the ops page read)."""
        d = asdict(self)
        d["missing"] = list(self.missing)
        return d


def decide_quantization(requested: str, fallback: str = "fail", *, cuda: bool,
                        bitsandbytes: bool) -> QuantizationPlan:
    """The decision, given what the machine has. Pure: the tests call it with every case."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {requested!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"quantization_fallback must be one of {FALLBACKS}, got {fallback!r}")
    if requested == "none":
        return QuantizationPlan("none", "none", False, (), None)
    missing = tuple(m for m, ok in ((MISSING_CUDA, cuda), (MISSING_BITSANDBYTES, bitsandbytes))
                    if not ok)
    if not missing:
        return QuantizationPlan("qlora", "qlora", False, (),
                                "4-bit NF4 base weights, double quantization, bf16 compute")
    lacking = " and ".join(missing)
    if fallback == "lora":
        return QuantizationPlan("qlora", "none", True, missing,
                                f"qlora requested, but {lacking}: trained plain LoRA "
                                "(training.quantization_fallback: lora)")
    return QuantizationPlan(
        "qlora", None, False, missing,
        f"training.quantization is qlora, but this machine cannot train QLoRA: {lacking}. Run the "
        "worker on a CUDA GPU with bitsandbytes installed, or set training.quantization_fallback: "
        "lora to train plain LoRA instead")


def machine_support() -> dict[str, bool]:
    """What this process has for QLoRA: a CUDA device torch can use, and bitsandbytes."""

    import torch

    return {"cuda": bool(torch.cuda.is_available()),
            "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}


def plan_quantization(requested: str, fallback: str = "fail") -> QuantizationPlan:
    """decide_quantization on this machine (probes CUDA only when qlora is requested)."""
    if requested == "none":
        return decide_quantization("none", fallback, cuda=False, bitsandbytes=False)
    return decide_quantization(requested, fallback, **machine_support())
