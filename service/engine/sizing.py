"""Engine sizing: are vLLM's --max-loras / --max-cpu-loras large enough for the aliases served?

Every replica holds every loaded version (there is no per-replica placement). Per alias that
serves an adapter, a replica may have to hold at once:

- the live version,
- the warm previous version (kept for the grace period, so rollback is instant),
- one staged version: a canary, or the candidate of a swap in progress.

So ``--max-cpu-loras`` (the adapters a replica keeps in memory) must be >= 3 x aliases. Above it
vLLM evicts the least recently used adapter and re-reads it from disk on its next request: no
error, but latency spikes on every swap.

``--max-loras`` is how many distinct adapters one batch may mix. Live traffic of every alias plus
its canary runs at once, so it must be >= aliases + canaries; below that, requests of different
aliases queue behind each other. vLLM itself requires max_cpu_loras >= max_loras.

The sizes are the engine's flags, which the gateway cannot read back from vLLM: set
FLYWHEEL_VLLM_MAX_LORAS / FLYWHEEL_VLLM_MAX_CPU_LORAS to the replicas' values (`flywheel engine`
starts managed replicas with them). The API checks them at start; a swap that would give an alias
its first adapter checks them again before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.engine.desired import alias_demand
from service.engine.residency import MAX_RESIDENT_VERSIONS

# live + warm previous + staged (canary or swap candidate); an alias's policy may lower it
# (serving.max_resident_versions), never raise it.
VERSIONS_HELD_PER_ALIAS = MAX_RESIDENT_VERSIONS


class EngineTooSmall(Exception):
    """The engine's LoRA slots cannot hold the versions the configured aliases need."""


@dataclass(frozen=True)
class EngineSize:
    """The replicas' LoRA flags (all replicas are started alike)."""

    max_loras: int
    max_cpu_loras: int


@dataclass(frozen=True)
class Demand:
    """How many LoRA versions the aliases need: held in memory, and mixed in one batch."""

    aliases: int
    canaries: int = 0

    @property
    def held(self) -> int:
        return VERSIONS_HELD_PER_ALIAS * self.aliases

    @property
    def served_at_once(self) -> int:
        return self.aliases + self.canaries


def problems(size: EngineSize, demand: Demand) -> list[str]:
    """Human-readable reasons the engine is too small; empty when it fits."""
    out = []
    if size.max_cpu_loras < size.max_loras:
        out.append(f"--max-cpu-loras {size.max_cpu_loras} is below --max-loras {size.max_loras} "
                   "(vLLM requires max_cpu_loras >= max_loras)")
    if size.max_cpu_loras < demand.held:
        out.append(f"--max-cpu-loras {size.max_cpu_loras} < {demand.held} needed: {demand.aliases} "
                   f"aliases x {VERSIONS_HELD_PER_ALIAS} (live + warm previous + staged/canary)")
    if size.max_loras < demand.served_at_once:
        out.append(f"--max-loras {size.max_loras} < {demand.served_at_once} needed: "
                   f"{demand.aliases} live aliases + {demand.canaries} canaries served at once")
    return out


def check(size: EngineSize, demand: Demand) -> None:
    """Raise EngineTooSmall with every reason and the fix, or return when the engine fits."""
    found = problems(size, demand)
    if found:
        need_cpu = max(demand.held, size.max_loras, demand.served_at_once)
        need_loras = max(demand.served_at_once, 1)
        raise EngineTooSmall(
            "the vLLM engine is too small for the aliases configured: " + "; ".join(found)
            + f". Start every replica with --max-loras >= {need_loras} and --max-cpu-loras >= "
            f"{need_cpu}, and set FLYWHEEL_VLLM_MAX_LORAS / FLYWHEEL_VLLM_MAX_CPU_LORAS to match.")


def check_db(session: Session, size: EngineSize) -> Demand:
    """Check the engine against the aliases the DB serves now; returns the demand it checked."""
    demand = Demand(*alias_demand(session))
    check(size, demand)
    return demand
