"""Adapters trained elsewhere (LLaMA-Factory, Axolotl, a notebook) registered as a new version
of an alias, then gated like any trained version.

The adapter is checked without loading anything (the files, the config, the safetensors header:
keys, ranks and every LoRA matrix's shape against the base model's own weights), copied into
the artifact store, and recorded as a candidate version with a run of its own. That run enters
the state machine where a trained run would be after training: the worker gathers the alias's
held-out ratings, verifies the artifact in full (finite weights and sha256 included, as every
version is verified before anything loads it), runs the eval gate, and the policy's approval
decides; deploy, canary, watch and rollback are the usual ones.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import repositories as repo
from service.db.models import ACTIVE_RUN_STATES, Adapter, RunState, TrainingRun
from service.domain.policy import Policy
from service.engine.artifact import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    ArtifactRejected,
    artifact_sha256,
    file_sha256,
    read_config,
    same_base_model,
    verify_artifact,
)
from service.files import publish_dir, staging_dir

ADAPTER_IMPORT = "adapter_import"  # training_runs.trigger.reason of an imported adapter's run
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
_PEFT_PREFIX = "base_model.model."
_HEADER_MAX = 100 << 20  # a safetensors header larger than this is not an adapter's


class AdapterRefused(Exception):
    """The adapter cannot become a version; `code` is short, `reason` names the file or field."""

    def __init__(self, reason: str, code: str, status: int = 422) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason, self.code, self.status = reason, code, status


@dataclass
class Checked:
    config: dict[str, Any]
    original_sha256: dict[str, str]  # per file, as received
    base_check: str  # how the adapter's base was matched to the engine's
    ignored: list[str] = field(default_factory=list)  # files received and not taken
    n_tensors: int = 0
    shapes_checked: bool = False


def _refuse_pickles(names: list[str]) -> None:
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles and WEIGHTS_FILE not in names:
        raise AdapterRefused(f"the weights are a pickle ({', '.join(pickles)}), which Flywheel never "
                             "loads: save the adapter as safetensors (PEFT's save_pretrained does "
                             "by default) and import adapter_model.safetensors", "pickle")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file (tensor name -> dtype, shape, offsets), read without
    torch: 8 bytes of little-endian length, then that much JSON."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise AdapterRefused(f"{path.name} is not a safetensors file (too short)", "bad_weights")
        (size,) = struct.unpack("<Q", raw)
        if size <= 0 or size > _HEADER_MAX:
            raise AdapterRefused(f"{path.name} is not a safetensors file (header size {size})",
                                 "bad_weights")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise AdapterRefused(f"{path.name}: the safetensors header is not JSON", "bad_weights") from exc
    if not isinstance(header, dict):
        raise AdapterRefused(f"{path.name}: the safetensors header is not an object", "bad_weights")
    header.pop("__metadata__", None)
    return header


def base_weight_shapes(base_model: str) -> dict[str, list[int]] | None:
    """Every weight's shape in a local base model directory (its safetensors headers); None for
    a hub id or a directory without safetensors."""
    root = Path(base_model)
    if not root.is_dir():
        return None
    shapes: dict[str, list[int]] = {}
    for f in sorted(root.glob("*.safetensors")):
        for name, meta in safetensors_header(f).items():
            if isinstance(meta, dict) and isinstance(meta.get("shape"), list):
                shapes[name] = meta["shape"]
    return shapes or None


def _check_header(path: Path, max_lora_rank: int, base_shapes: dict[str, list[int]] | None) -> int:
    """LoRA keys in pairs, ranks within the engine's, and (with the base's shapes) every matrix
    fitting the base module it adapts: the target modules exist and have those sizes."""
    header = safetensors_header(path)
    if not header:
        raise AdapterRefused(f"{WEIGHTS_FILE} holds no tensors", "bad_weights")
    halves: dict[str, dict[str, list[int]]] = {}
    for key, meta in header.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if suffix is None:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {key!r} is not a LoRA weight (lora_A/lora_B): "
                                 "a full model or merged weights are not an adapter", "bad_weights")
        if not isinstance(shape, list) or len(shape) != 2:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {key} has shape {shape}, expected a matrix",
                                 "bad_weights")
        halves.setdefault(key[:-len(suffix)], {})["A" if "_A" in suffix else "B"] = shape
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {module} has only its lora_{''.join(ab)} half",
                                 "bad_weights")
        rank_a, rank_b = ab["A"][0], ab["B"][1]
        if rank_a != rank_b:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {module}: lora_A rank {rank_a} and lora_B rank "
                                 f"{rank_b} differ", "bad_weights")
        if rank_a > max_lora_rank:
            raise AdapterRefused(f"{module} has rank {rank_a}, above the engine's max_lora_rank "
                                 f"{max_lora_rank} (FLYWHEEL_VLLM_MAX_LORA_RANK)", "rank_too_large")
        if base_shapes is None:
            continue
        target = module.removeprefix(_PEFT_PREFIX) + ".weight"
        if target not in base_shapes:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {module} adapts {target}, which the base model "
                                 "does not have: it was trained for another architecture",
                                 "wrong_modules")
        out_f, in_f = base_shapes[target][0], base_shapes[target][-1]
        if module.endswith("embed_tokens"):
            continue  # embedding LoRA halves are laid out differently; existence is checked
        if ab["A"][1] != in_f or ab["B"][0] != out_f:
            raise AdapterRefused(f"{WEIGHTS_FILE}: {module} maps {ab['A'][1]} -> {ab['B'][0]} but "
                                 f"the base's {target} is {in_f} -> {out_f}: it was trained on "
                                 "another model size", "wrong_shape")
    return len(header)


def _engine_names(engine_base: str) -> set[str]:
    """Names the engine's base model goes by: its directory's name and, for a model Flywheel
    prepared, the name in its flywheel-model.json."""
    root = Path(engine_base)
    names = {root.name} if root.name else set()
    meta = root / "flywheel-model.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("name")
        except (OSError, ValueError):
            name = None
        if isinstance(name, str) and name:
            names.add(name)
    return {n.lower() for n in names}


def _base_check(adapter_base: str, engine_base: str, same_base: bool) -> str:
    if same_base_model(adapter_base, engine_base):
        return "same model"
    # "HuggingFaceTB/SmolLM2-135M-Instruct" trained elsewhere, served here from a local copy.
    if adapter_base.rstrip("/").rsplit("/", 1)[-1].lower() in _engine_names(engine_base):
        return "same name"
    if same_base:
        return "asserted by the importer"
    raise AdapterRefused(f"adapter_config.json: base_model_name_or_path is {adapter_base!r} but "
                         f"the engine serves {engine_base!r}; if that is the same model under "
                         "another name, import again with same_base (CLI: --same-base)",
                         "wrong_base")


def check_dir(src: Path, *, engine_base: str, max_lora_rank: int, same_base: bool = False) -> Checked:
    """Everything that can be checked without loading a tensor; AdapterRefused otherwise."""
    if not src.is_dir():
        raise AdapterRefused(f"{src} is not a directory", "missing")
    names = sorted(p.name for p in src.iterdir())
    _refuse_pickles(names)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        p = src / name
        if not p.is_file() or p.is_symlink():
            raise AdapterRefused(f"{name} is missing from the adapter (a PEFT adapter directory "
                                 f"holds {CONFIG_FILE} and {WEIGHTS_FILE})", "missing")
    try:
        cfg = read_config(src / CONFIG_FILE)
    except ArtifactRejected as exc:
        raise AdapterRefused(exc.reason, exc.code) from exc
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise AdapterRefused("adapter_config.json names no base_model_name_or_path", "wrong_base")
    rank_pattern = cfg.get("rank_pattern") or {}
    too_large = {k: v for k, v in rank_pattern.items() if v > max_lora_rank}
    if cfg["r"] > max_lora_rank or too_large:
        raise AdapterRefused(f"adapter_config.json: r={cfg['r']}"
                             + (f", rank_pattern {too_large}" if too_large else "")
                             + f" exceeds the engine's max_lora_rank {max_lora_rank}",
                             "rank_too_large")
    if cfg.get("modules_to_save"):
        raise AdapterRefused(f"adapter_config.json: modules_to_save={cfg['modules_to_save']!r}; "
                             "vLLM serves no adapter that replaces whole modules", "modules_to_save")
    check = _base_check(base, engine_base, same_base)
    shapes = base_weight_shapes(engine_base)
    n = _check_header(src / WEIGHTS_FILE, max_lora_rank, shapes)
    return Checked(config=cfg, base_check=check, n_tensors=n, shapes_checked=shapes is not None,
                   original_sha256={name: file_sha256(src / name) for name in (CONFIG_FILE, WEIGHTS_FILE)},
                   ignored=[n for n in names if n not in (CONFIG_FILE, WEIGHTS_FILE)])


def unpack_tar(data: bytes, dest: Path) -> list[str]:
    """The adapter files of an uploaded tar (optionally gzipped) into dest: regular files only,
    by their base name, never extracted by the archive's own paths. Returns every member name."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as exc:
        raise AdapterRefused(f"the body is not a tar archive of the adapter directory ({exc})",
                             "bad_archive") from exc
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    with archive:
        for member in archive.getmembers():
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            names.append(member.name)
            if member.isfile() and base in (CONFIG_FILE, WEIGHTS_FILE) and not (dest / base).exists():
                src = archive.extractfile(member)
                if src is not None:
                    with src, open(dest / base, "wb") as out:
                        shutil.copyfileobj(src, out)
            elif base.lower().endswith(PICKLE_SUFFIXES):
                (dest / base).touch()  # only its name: a pickle's bytes are never written
    return names


def _copy_into_store(src: Path, artifact_dir: Path, engine_base: str, cfg: dict[str, Any]) -> Path:
    """The artifact directory: the weights as received and the config naming the engine's base
    (vLLM and the trainer load the base they serve; the original name stays in the lineage).
    Written under a temporary name and renamed, so a half-copied adapter is never a version."""
    final = artifact_dir / "imported" / uuid.uuid4().hex / "adapter"
    tmp = staging_dir(final)
    try:
        shutil.copyfile(src / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({**cfg, "base_model_name_or_path": engine_base},
                                                  indent=2, sort_keys=True))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(final.parent, ignore_errors=True)  # this import's own folder, half-copied
        raise
    return final


def _provenance(engine_base: str) -> dict[str, Any] | None:
    meta = Path(engine_base) / "flywheel-model.json"
    try:
        return json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Imported:
    run_id: uuid.UUID
    version_id: uuid.UUID
    lora_name: str
    sha256: str
    base_check: str
    ignored: list[str]


def register(session: Session, adapter: Adapter, src: Path, *, artifact_dir: Path,
             engine_base: str, max_lora_rank: int, policy: Policy, actor: str,
             note: str | None = None, same_base: bool = False,
             received_as: str | None = None, verify_weights: bool = False) -> Imported:
    """Check the adapter in `src`, copy it into the artifact store and record it as a candidate
    version of `adapter` with a run that the worker gates; AdapterRefused when it cannot be.

    verify_weights: also read every tensor now (verify_artifact: finite values), which needs
    torch; the CLI does, the API leaves it to the worker, which verifies before anything loads."""
    checked = check_dir(src, engine_base=engine_base, max_lora_rank=max_lora_rank,
                        same_base=same_base)
    # One active run per alias (uq_training_runs_one_active): say which, before copying.
    session.execute(select(Adapter.id).where(Adapter.id == adapter.id).with_for_update())
    active = session.scalars(select(TrainingRun).where(
        TrainingRun.adapter_id == adapter.id,
        TrainingRun.state.in_([s.value for s in ACTIVE_RUN_STATES]))).first()
    if active is not None:
        raise AdapterRefused(f"alias {adapter.alias!r} has an active run {active.id} "
                             f"({active.state}); import after it settles (approve or reject it)",
                             "run_active", status=409)
    dest = _copy_into_store(src, artifact_dir, engine_base, checked.config)
    try:
        sha = artifact_sha256(dest)
        if verify_weights:

            try:
                verify_artifact(dest, expected_sha256=sha, engine_base_model=engine_base,
                                max_lora_rank=max_lora_rank)
            except ArtifactRejected as exc:
                raise AdapterRefused(exc.reason, exc.code) from exc
        serving = adapter.serving_version_id
        run = TrainingRun(
            tenant_id=adapter.tenant_id, adapter_id=adapter.id, state=RunState.training.value,
            method="import", method_reason=f"trained elsewhere; imported by {actor}",
            trigger={"reason": ADAPTER_IMPORT, "by": actor, "note": note},
            policy=json.loads(policy.model_dump_json()),
            # It consumes no feedback: the buffer keeps counting toward the next training.
            feedback_seq_from=adapter.feedback_watermark, feedback_seq_to=adapter.feedback_watermark,
            parent_version_id=serving, attempts=0, progress={}, dataset_stats={}, metrics={},
            verdict={})
        session.add(run)
        session.flush()
        lineage = {
            "run_id": str(run.id), "base_model": engine_base,
            "base_model_provenance": _provenance(engine_base),
            "parent": {"version_id": str(serving)} if serving else None,
            "source": {"kind": "import", "by": actor, "note": note, "received_as": received_as,
                       "original_sha256": checked.original_sha256,
                       "original_base_model": checked.config.get("base_model_name_or_path"),
                       "base_check": checked.base_check, "shapes_checked": checked.shapes_checked,
                       "ignored_files": checked.ignored},
            "method": "import",
            "lora": {"r": checked.config["r"], "alpha": checked.config["lora_alpha"],
                     "target_modules": checked.config["target_modules"]},
        }
        version = repo.create_version(session, adapter, artifact_path=str(dest), sha256=sha,
                                      parent_version_id=serving, run_id=run.id, lineage=lineage)
        run.candidate_version_id = version.id
        repo.audit(session, tenant_id=adapter.tenant_id, actor=actor, action="adapter.imported",
                   target_type="version", target_id=str(version.id), reason=note,
                   detail={"version": version.lora_name, "run_id": str(run.id), "sha256": sha,
                           "base_check": checked.base_check, "ignored_files": checked.ignored})
        session.flush()
    except IntegrityError as exc:  # a run was created between the check and here
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise AdapterRefused(f"alias {adapter.alias!r} has an active run; import after it settles",
                             "run_active", status=409) from exc
    except BaseException:
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise
    return Imported(run_id=run.id, version_id=version.id, lora_name=version.lora_name, sha256=sha,
                    base_check=checked.base_check, ignored=checked.ignored)
