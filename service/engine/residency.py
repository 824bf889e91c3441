"""How many versions of one alias stay resident on a replica, and which go first.

Every replica holds the alias's desired versions (desired.py). Their roles:

- live: the version the alias serves;
- canary: the version the alias sends canary traffic to;
- warm: a version that stopped being served, kept for instant rollback (the previous version,
  for ``warm_grace_s``) or for stale routes and running requests (``drain_s``);
- staged: loaded without being routed (the gate's candidate, kept while it waits for approval).

The alias's policy bounds them (`serving.max_resident_versions`). Over the bound, the oldest
versions that nothing may be using go: never the live or canary version, never the candidate of
a run that is being gated or deployed, and never a warm version inside ``drain_s`` of the alias's
last change (stale routes and running requests may still use it). A warm version past that is
let go early (it is retired, as at the end of its warm period: a rollback to it then loads it
again first), and a staged one returns to `candidate`, loaded again by whatever swaps or stages
it later. Protected versions may exceed the bound for a while (back-to-back swaps inside
``drain_s``).

Pure functions; desired.py reads the rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from service.db.models import RunState, VersionStatus

# The most versions of one alias a replica holds in steady state: live + warm previous + staged
# or canary. sizing.py sizes the engine for it; a policy may only lower it.
MAX_RESIDENT_VERSIONS = 3

# (tenant, alias) -> the alias's bound.
BoundFor = Callable[[str, str], int]

# A candidate stays loaded while its run uses it: the gate generates with it, the deploy swaps it.
RUN_STATES_USING_CANDIDATE = (RunState.evaluating.value, RunState.approved.value,
                              RunState.deploying.value)


def default_bound(_tenant: str, _alias: str) -> int:
    return MAX_RESIDENT_VERSIONS


@dataclass(frozen=True)
class Resident:
    """A desired version of an alias, with its role and whether the bound may let it go."""

    version_id: uuid.UUID
    adapter_id: uuid.UUID
    tenant_id: str
    alias: str
    lora_name: str
    number: int
    status: str
    role: str
    protected: bool

    @property
    def evicted_status(self) -> str:
        """The status a version let go by the bound takes."""
        if self.status == VersionStatus.warm.value:
            return VersionStatus.retired.value
        return VersionStatus.candidate.value


def role_of(version_id: uuid.UUID, status: str, serving: uuid.UUID | None,
            canary: uuid.UUID | None) -> str:
    """live | canary | warm | staged for a desired version; its status for any other."""
    if version_id == serving:
        return "live"
    if version_id == canary:
        return "canary"
    return status


def resident(row, in_run: bool, drained: bool = False) -> Resident:
    """A Resident from a row carrying version and adapter columns (desired.residents); drained:
    the alias last changed more than drain_s ago (a warm version may then go)."""
    role = role_of(row.id, row.status, row.serving_version_id, row.canary_version_id)
    spare = role == VersionStatus.staged.value or (role == VersionStatus.warm.value and drained)
    protected = not spare or in_run
    return Resident(row.id, row.adapter_id, row.tenant_id, row.alias, row.lora_name, row.number,
                    row.status, role, protected)


def beyond_bound(versions: Iterable[Resident], bound: int) -> list[Resident]:
    """The versions to let go so that at most ``bound`` stay: oldest unprotected first."""
    versions = list(versions)
    excess = len(versions) - max(bound, 1)
    if excess <= 0:
        return []
    spare = sorted((v for v in versions if not v.protected), key=lambda v: v.number)  # oldest first
    return spare[:excess]
