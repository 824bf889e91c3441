"""The one Settings object. Every knob is an environment variable with the FLYWHEEL_ prefix."""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from service.models.resolve import resolved_path


class Settings(BaseSettings):
    """Flywheel configuration. Unset service URLs mean: start embedded servers under data_dir."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=None, extra="ignore")

    # Where embedded servers, artifacts and the tiny model live when nothing else is configured.
    data_dir: Path = Field(default=Path(".flywheel"))

    database_url: str | None = None
    broker_url: str | None = None
    # Comma-separated list of vLLM OpenAI server base URLs (without /v1).
    vllm_urls: str | None = None
    # Unset: the embedded default, SmolLM2-135M-Instruct from pip, prepared under model_cache_dir.
    # Else a Hugging Face model directory, a .gguf file (converted once) or a hub id.
    base_model: str | None = None
    # Prepared models (the default and converted GGUFs); shared by every checkout on the machine.
    model_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "flywheel" / "models")
    # The name the engine serves the base model under (vLLM --served-model-name).
    base_model_name: str = "base"
    artifact_dir: Path | None = None
    policy_dir: Path = Field(default=Path("policies"))

    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # Gateway
    max_body_bytes: int = 1_000_000
    # The body limit of a feedback import (POST /v1/adapters/{alias}/imports), which is the
    # whole export file held in memory while it is checked; bigger files: `flywheel import`.
    import_max_bytes: int = Field(64_000_000, ge=1)
    # The body limit of an adapter upload (POST /v1/adapters/{alias}/versions: a tar of the
    # adapter directory, held in memory); bigger adapters: `flywheel adapters import`.
    adapter_upload_max_bytes: int = Field(256_000_000, ge=1)
    upstream_timeout_s: float = 120.0
    upstream_connect_timeout_s: float = 2.0
    retry_after_s: int = 5
    # How long a gateway process may serve a stale alias -> version mapping.
    routing_cache_ttl_s: float = 1.0
    # How long a verified API key is trusted without re-reading the DB (revocation bound).
    auth_cache_ttl_s: float = 5.0
    # /metrics: with a token, every series for its bearer only; without, tenant-free series.
    metrics_token: SecretStr | None = None
    metrics_cache_s: float = Field(5.0, ge=0)
    # Failed key lookups per client address and minute before 429 (per API process).
    auth_failures_per_minute: int = Field(60, ge=1)

    # Where interactions and ratings wait when Postgres cannot take them (fsync'd, replayed in
    # order when it is back); default: data_dir/spool. Past spool_max_mb, writes get 503.
    spool_dir: Path | None = None
    spool_max_mb: int = Field(512, ge=1)
    spool_replay_interval_s: float = Field(0.5, gt=0)

    # Feedback rate limits per minute (0 disables); a poisoning guard, shared by API processes.
    feedback_rate_per_tenant: int = 20_000
    feedback_rate_per_rater: int = 120
    feedback_rate_per_key: int = 10_000  # per API key, however many rater ids it posts as

    # How long a download link for an export file stays valid (it needs no key while it does).
    download_link_ttl_s: int = Field(300, ge=10, le=86_400)

    # Feedback marks its adapter; the trigger runs for marked adapters this often.
    trigger_debounce_s: float = 0.25

    # Engine (managed vLLM for local runs and tests)
    vllm_port: int = 8100
    vllm_max_loras: int = 4
    vllm_max_cpu_loras: int = 8
    vllm_max_lora_rank: int = 16
    # The most context (prompt + answer, in tokens) served and trained; the model's own maximum
    # when that is smaller. Sized to memory: KV cache and training activations grow with it.
    vllm_max_model_len: int = Field(2048, ge=64)
    vllm_kv_cache_gb: int = 1
    # Compute threads of a managed CPU engine; 0: all cores but one (the API, the database and
    # the trainer share the machine with it).
    vllm_cpu_threads: int = Field(0, ge=0)

    # Engine control (service/engine: swap, rollback, reconcile; sizing rules in sizing.py)
    # How long the previous version stays loaded after a flip, so rollback needs no load.
    warm_grace_s: float = 600.0
    # The least time a version stays loaded after it stops being served: it must cover stale
    # route caches (routing_cache_ttl_s) and requests still running on that version.
    drain_s: float = 30.0
    # How often each API process re-reads every replica's GET /v1/models for routing.
    replica_observe_interval_s: float = 1.0
    # How often each API process converges the replicas to the DB's desired state (0: never).
    reconcile_interval_s: float = 5.0
    # How long a swap waits for another swap (or the reconciler) holding the same alias.
    swap_lock_wait_s: float = 10.0
    # At API start, when FLYWHEEL_VLLM_MAX_LORAS / _MAX_CPU_LORAS are too small for the aliases.
    engine_sizing_check: Literal["error", "warn", "off"] = "error"

    # Replica discovery (service/engine/discovery.py): a name in FLYWHEEL_VLLM_URLS with several
    # addresses (a Kubernetes headless Service) is one replica per address. How often each API
    # process resolves the names again (0: only at start); workers and the CLI resolve per call.
    replica_discovery_interval_s: float = Field(5.0, ge=0)

    # Workers
    # Must exceed the longest training: Redis redelivers unacked messages after it (celery #5935).
    broker_visibility_timeout_s: int = 6 * 3600
    run_lease_s: float = 60.0
    sweep_interval_s: float = 10.0
    # The sweeper re-sends a wake-up no worker has taken after this long (a worker that died
    # holding an unstarted message); sooner once a worker took it.
    wake_resend_after_s: float = 600.0
    watch_interval_s: float = 15.0
    training_device: str = "auto"

    # Training jobs (workers/trainer/): every training runs as `accelerate launch` of
    # workers.training in its own process group, which outlives a worker crash; the run row keeps
    # the job's reference and the next worker re-attaches to it.
    train_backend: Literal["local"] = "local"
    # Processes per machine; None: the accelerate config file's, else 1. More than one trains DDP
    # (gloo on CPU, nccl on GPUs) with workers/accelerate/ddp_cpu.yaml unless a config is given.
    train_processes: int | None = Field(None, ge=1)
    # Machines in one training; rank 0 is the worker's, the others join with
    # `python -m workers.trainer.job join JOB_DIR --machine-rank N` (the job dir on shared storage).
    train_machines: int = Field(1, ge=1)
    # Rank 0's address the other machines reach (needed with train_machines > 1).
    train_main_address: str | None = None
    # The rendezvous port; None: a free port on this machine (single machine only).
    train_main_port: int | None = Field(None, ge=1, le=65535)
    # An accelerate config file (FSDP, DeepSpeed ZeRO-3: workers/accelerate/*.yaml, or your own).
    train_accelerate_config: Path | None = None
    # A job nobody has polled for this long stops itself (its worker died and none took the run
    # over); None: 3 x run_lease_s, at least 30 s. The run resumes from its checkpoint later.
    train_orphan_after_s: float | None = Field(None, gt=0)
    # Times a training process that died without an error (killed, OOM) is started again from its
    # last checkpoint before the run fails.
    train_max_restarts: int = Field(2, ge=0)
    # How often the worker reads a running job's progress and state.
    train_poll_interval_s: float = Field(1.0, gt=0)
    # The AI judge (policy `judge`): how often beat sends its sweep, the most one sweep may take
    # (it shares the control queue with the trigger sweep and the watch), and the key sent to
    # judge endpoints that want one.
    judge_interval_s: float = Field(60.0, gt=0)
    judge_sweep_max_s: float = Field(45.0, gt=0)
    judge_api_key: SecretStr | None = None

    # Database pool
    db_pool_size: int = 20
    db_max_overflow: int = 20
    db_connect_timeout_s: float = 3.0

    log_level: str = "INFO"

    # prometheus_client's own variable: set it when several processes serve metrics.
    prometheus_multiproc_dir: Path | None = Field(
        default=None, validation_alias="PROMETHEUS_MULTIPROC_DIR"
    )

    @field_validator("vllm_urls")
    @classmethod
    def _strip_urls(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @property
    def vllm_url_list(self) -> list[str]:
        """Configured vLLM replica base URLs, without trailing slashes."""
        if not self.vllm_urls:
            return []
        return [u.strip().rstrip("/") for u in self.vllm_urls.split(",") if u.strip()]

    @property
    def resolved_base_model(self) -> str:
        """The base model directory (or hub id) engines and trainers load; no I/O."""

        return resolved_path(self.base_model, self.model_cache_dir)

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or (self.data_dir / "artifacts")

    def spool_dir_for(self, database_url: str) -> Path:
        """The spool folder for one database: records are only ever replayed into the
        database they were meant for, even when checkouts share a spool_dir."""

        url = make_url(database_url)
        where = f"{url.host}:{url.port}/{url.database}"
        tag = blake2b(where.encode(), digest_size=6).hexdigest()
        return (self.spool_dir or self.data_dir / "spool") / f"{url.database}-{tag}"

    @property
    def embedded_dir(self) -> Path:
        return self.data_dir / "embedded"


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
