"""Policies: what ops decide per alias (trigger, training, gate, approval, canary, serving, watch,
rollback, edge export).

policies/default.yaml applies to every alias; policies/<alias>.yaml (for the tenants it names)
or <tenant>--<alias>.yaml (which wins) is deep-merged over it. Files are validated at start;
a bad file names itself, the field and why. Policies are re-read when their files change
(checked on each lookup, cheap stat).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerPolicy(_Strict):
    """When a retrain starts: enough new ratings since the last run (or enough time)."""

    min_new_ratings: int = Field(50, ge=1)
    min_up: int = Field(0, ge=0)
    min_down: int = Field(0, ge=0)
    # Train after this long even below min_new_ratings, if at least min_ratings_for_interval came.
    max_interval_minutes: float | None = Field(None, gt=0)
    min_ratings_for_interval: int = Field(1, ge=1)


class LoraPolicy(_Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class TrainingPolicy(_Strict):
    method: Literal["auto", "sft", "kto", "dpo"] = "auto"
    start_from: Literal["serving", "base"] = "serving"
    lora: LoraPolicy = Field(default_factory=LoraPolicy)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    epochs: float = Field(1.0, gt=0, le=100)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    beta: float = Field(0.1, gt=0)
    # DPO: an SFT term on the chosen answers beside the preference loss (RPO), so DPO cannot
    # win by making both answers unlikely. 0 = plain DPO.
    dpo_sft_weight: float = Field(1.0, ge=0)
    # Each round continues the serving adapter with a fresh optimizer: a warm-up keeps the
    # first steps from jolting it at the peak learning rate.
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    # Tokens per example (prompt + answer); unset: the engine's context. Longer examples are
    # dropped (counted in the run's dataset stats), never cut mid-answer.
    max_length: int | None = Field(None, ge=16)
    quantization: Literal["none", "qlora"] = "none"
    # Where qlora cannot run (no CUDA, or no bitsandbytes): "fail" fails the run naming what is
    # missing; "lora" trains plain LoRA and the run shows the fallback (CLI, ops page). Never
    # silent. No effect with quantization: none.
    quantization_fallback: Literal["fail", "lora"] = "fail"
    checkpoint_every_steps: int = Field(20, ge=1)
    seed: int = 0


class DatasetPolicy(_Strict):
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    replay_fraction: float = Field(0.2, ge=0, lt=1)
    # Poisoning guard: no rater supplies more than this share of a training set. Applied when
    # the feedback names at least two raters (one anonymous product key is one rater).
    max_rater_share: float | None = Field(0.5, gt=0, le=1)
    max_chars: int = Field(8000, ge=1)
    redactor: Literal["regex", "presidio", "none"] = "regex"
    min_examples: int = Field(4, ge=1)


class GoldenCase(_Strict):
    prompt: str = Field(min_length=1)
    must_contain: list[str] = Field(default_factory=list)
    must_not_contain: list[str] = Field(default_factory=list)
    regex: str | None = None
    json_valid: bool = False
    # Generic checks that need no knowledge of the alias's task (the default policy's suite).
    non_empty: bool = False
    no_template_tokens: bool = False  # no chat-template markup (<|im_end|>, [INST], ...) leaked
    max_repetition: float | None = Field(None, ge=0, le=1)  # share of repeated word 3-grams
    max_tokens: int = Field(32, ge=1)


class GatePolicy(_Strict):
    min_preference_accuracy: float = Field(0.5, ge=0, le=1)
    max_nll_regression: float = Field(0.05, ge=0)
    # Absolute slack in nats/token: near zero NLL a relative bound is only noise.
    max_nll_regression_abs: float = Field(0.02, ge=0)
    golden: list[GoldenCase] = Field(default_factory=list)
    # The candidate's greedy answers to held-out corrected prompts against the serving
    # version's (workers.answer_check): among the prompts where one is closer to the user's
    # correction, the share the candidate wins must reach this. None: measured, not gated.
    min_answer_win_rate: float | None = Field(None, ge=0, le=1)
    # Evidence: held-out ratings scored plus golden cases run. Below min_evidence the candidate
    # is rejected, saying so; with none at all only allow_unmeasured lets it through.
    min_evidence: int = Field(1, ge=0)
    allow_unmeasured: bool = False
    answer_max_tokens: int = Field(96, ge=1, le=4096)
    max_answers: int = Field(32, ge=0, le=1000)


class CanaryPolicy(_Strict):
    share: float = Field(0.0, ge=0, le=1)


class ServingPolicy(_Strict):
    """What the alias keeps loaded on every vLLM replica (service/engine/residency.py)."""

    # Versions of the alias resident per replica: live + warm previous + canary or staged. Past
    # it the oldest staged versions nothing is using go back to candidate and are unloaded; the
    # live, canary and warm versions and a run's candidate in use are never let go. At most 3:
    # the engine's sizing check (sizing.py) counts 3 per alias, so a policy can only lower it.
    max_resident_versions: int = Field(3, ge=1, le=3)


class WatchPolicy(_Strict):
    window_minutes: float = Field(60, gt=0)
    min_samples: int = Field(30, ge=1)
    max_drop: float = Field(0.1, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)


class RollbackPolicy(_Strict):
    automatic: bool = True


class ExportTolerance(_Strict):
    """How close an export must stay to the served version (workers.export.Tolerance)."""

    min_token_agreement: float = Field(0.95, ge=0, le=1)
    tie_margin: float = Field(0.05, ge=0)
    max_nll_delta: float = Field(0.02, ge=0)
    min_exact_match: float | None = Field(None, ge=0, le=1)
    min_tokenizer_agreement: float = Field(1.0, ge=0, le=1)


# Spelled out as Literals so that type checkers see the values; the tuples follow from them.
ExportFormat = Literal["merged", "gguf"]
# Most to least aggressive (workers.export falls back along this order).
ExportQuant = Literal["tq2_0", "q2_k", "q4_0", "q4_k_m", "q8_0", "f16"]
EXPORT_QUANTS: tuple[str, ...] = get_args(ExportQuant)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


class ExportSpec(_Strict):
    format: ExportFormat
    quant: ExportQuant | None = None

    @model_validator(mode="after")
    def _quant_fits_format(self) -> ExportSpec:
        if self.format == "gguf" and self.quant is None:
            raise ValueError("a gguf export needs a quant (f16, q8_0, q4_k_m, ...)")
        if self.format == "merged" and self.quant is not None:
            raise ValueError("a merged export is not quantized: drop quant")
        return self


class ExportPolicy(_Strict):
    """Edge exports: which to build on every promotion, and the consistency gate's limits."""

    on_promotion: list[ExportSpec] = Field(default_factory=list)
    # On a failed gate, try the next less aggressive quantization instead of only suggesting it.
    fallback: bool = False
    tolerance: ExportTolerance = Field(default_factory=ExportTolerance)
    # Held-out prompts compared after the golden ones (golden first: they are what ops chose).
    max_prompts: int = Field(32, ge=1, le=512)
    max_new_tokens: int = Field(16, ge=1, le=256)


DEFAULT_RUBRIC = ("A good answer does what the user asked, is correct, stays on topic and "
                  "follows any instructions in the conversation. A bad answer is wrong, "
                  "evasive, off topic, rude, or ignores the instructions.")


class JudgePolicy(_Strict):
    """An LLM judge that rates traffic nobody rated (workers.judge). Off unless url and model
    are set. Its ratings are stored as feedback with source `judge`, capped to `max_share` of a
    training set, never held out or used by the gate, the watch window or the thumbs-up rates."""

    # An OpenAI-compatible base URL (".../v1"); its key, if any, is FLYWHEEL_JUDGE_API_KEY.
    url: str | None = Field(None, pattern=r"^https?://\S+$")
    model: str | None = Field(None, min_length=1, max_length=200)
    rubric: str = Field(DEFAULT_RUBRIC, min_length=1, max_length=8000)
    # absolute: each answer alone, up or down. relative: the answers to one prompt are scored
    # against each other in one call (RULER-style); a prompt with one answer is rated alone.
    mode: Literal["absolute", "relative"] = "absolute"
    group_size: int = Field(4, ge=2, le=8)
    # relative: an answer scoring at least this (0-1) is a thumbs-up.
    up_threshold: float = Field(0.5, ge=0, le=1)
    # Interactions sent to the judge per rolling hour, failed attempts included.
    budget_per_hour: int = Field(60, ge=0, le=100_000)
    # The most judge-rated examples in a training set, as a share of it.
    max_share: float = Field(0.25, ge=0, lt=1)
    # The budget's share spent on interactions humans rated too: only these measure agreement
    # (human ratings win there, so they never train).
    calibration_share: float = Field(0.1, ge=0, le=1)
    # Whether judge ratings count toward the trigger's min_new_ratings (they always train).
    counts_toward_trigger: bool = False
    # Only answers at least this old (a human rates first) and at most lookback_hours old.
    min_age_s: float = Field(60.0, ge=0)
    lookback_hours: float = Field(24.0, gt=0)
    timeout_s: float = Field(30.0, gt=0, le=600)
    # Retries of one call (backoff doubling from backoff_s) before it is skipped with a reason.
    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(1.0, ge=0, le=60)
    max_tokens: int = Field(256, ge=16, le=4096)
    # Ask for JSON by schema (response_format json_schema); off for endpoints without it.
    structured: bool = True

    @property
    def enabled(self) -> bool:
        """Whether a judge is configured."""
        return bool(self.url and self.model and self.budget_per_hour > 0)

    @model_validator(mode="after")
    def _both_or_neither(self) -> JudgePolicy:
        if bool(self.url) != bool(self.model):
            raise ValueError("a judge needs both url and model (or neither)")
        return self


class Policy(_Strict):
    """The whole policy of one alias."""

    trigger: TriggerPolicy = Field(default_factory=TriggerPolicy)
    training: TrainingPolicy = Field(default_factory=TrainingPolicy)
    dataset: DatasetPolicy = Field(default_factory=DatasetPolicy)
    gate: GatePolicy = Field(default_factory=GatePolicy)
    approval: Literal["auto", "manual"] = "manual"
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    serving: ServingPolicy = Field(default_factory=ServingPolicy)
    watch: WatchPolicy = Field(default_factory=WatchPolicy)
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy)
    export: ExportPolicy = Field(default_factory=ExportPolicy)
    judge: JudgePolicy = Field(default_factory=JudgePolicy)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        if self.training.lora.alpha < self.training.lora.r // 4:
            raise ValueError("training.lora.alpha is far below r; the adapter would barely train")
        return self


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; the message names the file, the field and why."""


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the top level must be a mapping of policy sections")
    return data


def _validate(path: Path, data: dict) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise PolicyError(f"{path}: field {field}: {first['msg']}") from exc


_MISSING = object()


def _tenants(path: Path, value: Any) -> frozenset[str] | None:
    """A shared file's `tenants`: a list of tenant ids, or "*" (None: every tenant)."""
    if value == "*":
        return None
    if value is _MISSING:
        raise PolicyError(f"{path}: field tenants: a shared alias file must name the tenants it "
                          f"applies to (tenants: [acme, globex], or tenants: \"*\" for every "
                          f"tenant); a tenant's own file is <tenant>--<alias>.yaml")
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise PolicyError(f"{path}: field tenants: a list of tenant ids, or \"*\"")
    return frozenset(value)


class PolicyStore:
    """Loads and validates every policy file; reloads when a file changes.

    A shared alias file (`<alias>.yaml`) applies only to the tenants it names (`tenants:`), so
    one tenant's alias never takes, or shows, a policy (golden prompts included) written for
    another's alias of the same name; `<tenant>--<alias>.yaml` always wins.
    """

    def __init__(self, policy_dir: Path) -> None:
        self.policy_dir = Path(policy_dir)
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._raw: dict[str, dict] = {}
        self._default: Policy = Policy()
        self._checked_at = 0.0
        self._cache: dict[tuple[str, str | None], Policy] = {}
        self._shared: dict[str, frozenset[str] | None] = {}
        self.reload()

    def _current_stamp(self) -> tuple:
        if not self.policy_dir.is_dir():
            return ()
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                            for p in self.policy_dir.glob("*.yaml")))

    def reload(self) -> None:
        """Read and validate all files; raises PolicyError on the first bad one (state unchanged)."""
        stamp = self._current_stamp()
        raw: dict[str, dict] = {}
        shared: dict[str, frozenset[str] | None] = {}
        for path in sorted(self.policy_dir.glob("*.yaml")) if self.policy_dir.is_dir() else []:
            data = _read_yaml(path)
            tenants = data.pop("tenants", _MISSING)
            if path.stem == "default" or "--" in path.stem:
                if tenants is not _MISSING:
                    raise PolicyError(f"{path}: field tenants: only a shared alias file "
                                      f"(<alias>.yaml) names the tenants it applies to")
            else:
                shared[path.stem] = _tenants(path, tenants)
            raw[path.stem] = data
        default_raw = raw.get("default", {})
        default = _validate(self.policy_dir / "default.yaml", default_raw)
        for name, data in raw.items():
            if name != "default":
                _validate(self.policy_dir / f"{name}.yaml", _merge(default_raw, data))
        with self._lock:
            self._raw, self._default, self._stamp = raw, default, stamp
            self._shared = shared
            self._cache = {}

    def _maybe_reload(self) -> None:
        # A stat of the directory at most once a second: lookups sit on the feedback hot path.
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        if self._current_stamp() != self._stamp:
            try:
                self.reload()
            except PolicyError:
                # A bad edit at run time keeps the last good policies; `flywheel policies check`
                # and start-up report it.

                logging.getLogger(__name__).exception("policy reload failed; keeping previous")
                self._stamp = self._current_stamp()

    def for_alias(self, alias: str, tenant_id: str | None = None) -> Policy:
        """The merged policy of an alias (tenant-specific file first)."""
        self._maybe_reload()
        cached = self._cache.get((alias, tenant_id))
        if cached is not None:
            return cached
        policy = self._resolve(alias, tenant_id)
        self._cache[(alias, tenant_id)] = policy
        return policy

    def max_resident_versions(self, tenant_id: str, alias: str) -> int:
        """The alias's residency bound (the reconciler's BoundFor); the built-in default when its
        policy cannot be read."""
        try:
            return self.for_alias(alias, tenant_id).serving.max_resident_versions
        except (PolicyError, ValidationError, OSError):
            logging.getLogger(__name__).exception("policy of %s/%s unreadable", tenant_id, alias)
            return ServingPolicy().max_resident_versions

    def source_for(self, alias: str, tenant_id: str | None = None) -> list[str]:
        """The files that make up an alias's policy, most general first (none: built-in)."""
        self._maybe_reload()
        with self._lock:
            own = self._own_file(self._raw, alias, tenant_id)
            general = ["default.yaml"] if "default" in self._raw else []
        return general + ([f"{own}.yaml"] if own else [])

    def _own_file(self, raw: dict[str, dict], alias: str, tenant_id: str | None) -> str | None:
        """The tenant's own file, else the shared alias file if it names this tenant (or "*");
        with no tenant (the CLI without --tenant), the shared file."""
        if tenant_id and f"{tenant_id}--{alias}" in raw:
            return f"{tenant_id}--{alias}"
        if alias in raw and alias != "default":
            tenants = self._shared.get(alias)
            if tenant_id is None or tenants is None or tenant_id in tenants:
                return alias
        return None

    def _resolve(self, alias: str, tenant_id: str | None) -> Policy:
        with self._lock:
            raw = self._raw
            own = self._own_file(raw, alias, tenant_id)
            if own is None:
                return self._default
            return Policy.model_validate(_merge(raw.get("default", {}), raw[own]))
