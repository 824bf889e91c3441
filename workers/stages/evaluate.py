"""The evaluate stage (evaluating -> awaiting_approval | approved | rejected), the eval gate:
verify the candidate, score it against the serving version on held-out data (transformers +
PEFT), run the golden suite and compare held-out answers through vLLM, and let the pure rule
(workers/gate.py) decide."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, EvalResult, RunState, TrainingRun, VersionStatus
from service.db.session import session_scope
from service.domain import runs
from service.domain.policy import Policy
from service.engine import swap as engine_swap
from service.engine.artifact import ArtifactRejected, verify_artifact
from service.engine.vllm_admin import replica_admins_for
from workers.answer_check import compare
from workers.context import StepFailed, WorkerContext, heldout_raw
from workers.dataset import heldout_answer, heldout_completion
from workers.gate import check_golden_output, decide

log = logging.getLogger(__name__)


def completion_logprobs(model, tokenizer, items: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each completion given its prompt, and its token count."""
    import torch  # heavy

    out = []
    for prompt, completion in items:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not c_ids:
            out.append((0.0, 0))
            continue
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        start = len(p_ids) - 1
        picked = logp[start:, :].gather(1, targets[start:].unsqueeze(1)).squeeze(1)
        out.append((float(picked.sum()), len(c_ids)))
    return out


def offline_metrics(base_model: str, candidate_dir: str, reference_dir: str | None,
                    heldout: list[dict]) -> dict[str, Any]:
    """Preference accuracy, implied reward margin and NLL of good answers, candidate vs reference."""
    import torch  # heavy: torch, PEFT and transformers load only when a gate runs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, candidate_dir, adapter_name="candidate")
    if reference_dir:
        model.load_adapter(reference_dir, adapter_name="reference")
    model.eval()

    def score(items: list[tuple[str, str]], which: str) -> list[tuple[float, int]]:
        if which == "base":
            with model.disable_adapter():
                return completion_logprobs(model, tokenizer, items)
        model.set_adapter(which)
        return completion_logprobs(model, tokenizer, items)

    ref_name = "reference" if reference_dir else "base"

    def completion(h, target):
        return (h["prompt"], heldout_completion(h, target, tokenizer))

    # Implicit rewards r = log p_candidate - log p_reference (as in DPO) of every rated answer
    # and correction. Preference accuracy compares rewards across pairs, so a candidate that
    # lifts all in-domain text alike gains nothing: (correction, rejected answer) pairs and
    # (thumbs-up, thumbs-down) cross pairs. An answer that called tools is rated as its calls.
    rated = [h for h in heldout if h.get("response") or h.get("response_tool_calls")]
    items = [completion(h, heldout_answer(h)) for h in rated]
    corrected = [h for h in rated if h.get("correction")]
    items += [completion(h, h["correction"]) for h in corrected]
    # Evidence: held-out ratings that enter a measurement (a pair, or a good answer's NLL); a
    # thumbs-down with no thumbs-up to pair it with and no correction measures nothing.
    has_up = any(h["rating"] == "up" for h in rated)
    measured = [h for h in rated if h.get("correction") or h["rating"] == "up" or has_up]
    metrics: dict[str, Any] = {"reference": "the serving version" if reference_dir else "base",
                               "n_heldout": len(measured)}
    if items:
        cand, ref = score(items, "candidate"), score(items, ref_name)
        rewards = [c[0] - r[0] for c, r in zip(cand, ref, strict=True)]
        answer_reward = dict(zip(range(len(rated)), rewards[:len(rated)], strict=True))
        pairs = [(rewards[len(rated) + k], answer_reward[rated.index(h)])
                 for k, h in enumerate(corrected)]
        ups = [answer_reward[i] for i, h in enumerate(rated) if h["rating"] == "up"]
        downs = [answer_reward[i] for i, h in enumerate(rated) if h["rating"] == "down"]
        pairs += [(u, d) for u in ups for d in downs][:5000]
        if pairs:
            margins = [c - r for c, r in pairs]
            metrics.update(preference_accuracy=sum(m > 0 for m in margins) / len(margins),
                           reward_margin=sum(margins) / len(margins), n_preference=len(margins))
    good = [completion(h, h["correction"] or heldout_answer(h))
            for h in heldout if h.get("correction") or h.get("rating") == "up"]
    if good:
        def nll(scores):
            tokens = sum(n for _, n in scores) or 1
            return -sum(lp for lp, _ in scores) / tokens
        metrics.update(nll_candidate=nll(score(good, "candidate")),
                       nll_reference=nll(score(good, ref_name)),
                       nll_base=nll(score(good, "base")), n_nll=len(good))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()}


async def _through_vllm(ctx: WorkerContext, version_id, lora_name: str, reference_name: str,
                        gate, answer_items: list[dict]) -> tuple[list[dict] | None, dict]:
    """Stage the candidate (verified, loaded on every replica, kept by the reconciler), then
    generate with it: each golden prompt, and the held-out corrected prompts beside the
    reference's answers to them. Returns (golden results or None, answer metrics)."""
    async with replica_admins_for(ctx.settings) as admins:
        staged = await engine_swap.stage(ctx.sessions, admins, version_id,
                                         engine_swap.SwapConfig.from_settings(ctx.settings),
                                         actor="gate", reason="golden suite and held-out answers")
        if not staged.ok:
            failed = [{"prompt": "(staging)", "output": "", "passed": False,
                       "failures": [f"could not stage the candidate: {staged.reason}"]}]
            return failed, {}
        golden = None
        if gate.golden:
            golden = []
            for case in gate.golden:
                output = await admins[0].smoke(lora_name, prompt=case.prompt,
                                               max_tokens=case.max_tokens)
                failures = check_golden_output(case, output)
                golden.append({"prompt": case.prompt, "output": output, "passed": not failures,
                               "failures": failures})
        answers: dict = {}
        if answer_items:
            sem = asyncio.Semaphore(8)  # the engine batches concurrent requests

            async def both(h: dict) -> tuple[str, str, str]:
                async with sem:
                    # The request's tools and template kwargs too, so both answer the prompt
                    # the user was served (older records have none).
                    request = h.get("params") or {}
                    cand, ref = await asyncio.gather(
                        admins[0].complete(lora_name, h["messages"], gate.answer_max_tokens,
                                           request=request),
                        admins[0].complete(reference_name, h["messages"], gate.answer_max_tokens,
                                           request=request))
                return cand, ref, h["correction"]

            rows = await asyncio.gather(*(both(h) for h in answer_items))
            answers = compare(list(rows))
        return golden, answers


def evaluate(ctx: WorkerContext, claim: runs.Claim) -> str:
    """Gate the run's candidate; returns the run's next state."""
    settings = ctx.settings
    with session_scope(ctx.sessions) as s:
        run = repo.get_row(s, TrainingRun, claim.run_id)
        if run.candidate_version_id is None:
            raise StepFailed(f"run {claim.run_id} is evaluating but has no candidate version")
        candidate = repo.get_row(s, AdapterVersion, run.candidate_version_id)
        adapter = repo.get_row(s, Adapter, run.adapter_id)
        reference = (repo.get_row(s, AdapterVersion, adapter.serving_version_id)
                     if adapter.serving_version_id else None)
        policy = Policy.model_validate(run.policy)
        cand = (candidate.id, candidate.artifact_path, candidate.sha256, candidate.lora_name)
        ref = (reference.artifact_path, reference.sha256, reference.lora_name) if reference else None
        ref_dir = ref[0] if ref else None
        tenant_id = adapter.tenant_id
    try:
        verify_artifact(cand[1], expected_sha256=cand[2], engine_base_model=ctx.base_model(),
                        max_lora_rank=settings.vllm_max_lora_rank)
    except ArtifactRejected as exc:
        return _reject(ctx, claim, cand[0], tenant_id, [f"artifact refused: {exc.reason}"], {}, None)
    if ref is not None:
        # The reference is loaded into this process too: never without its checksum.
        try:
            verify_artifact(ref[0], expected_sha256=ref[1], engine_base_model=ctx.base_model(),
                            max_lora_rank=settings.vllm_max_lora_rank)
        except ArtifactRejected as exc:
            raise StepFailed(f"serving version {ref[2]} failed verification: {exc.reason}") from exc

    heldout = heldout_raw(ctx, claim.run_id)
    metrics = offline_metrics(ctx.base_model(), cand[1], ref_dir, heldout)
    golden = None
    corrected = [h for h in heldout if h.get("correction") and h.get("messages")]
    corrected = corrected[:policy.gate.max_answers]
    wants_answers = bool(corrected) and policy.gate.min_answer_win_rate is not None
    if policy.gate.golden or wants_answers:
        if not settings.vllm_url_list:
            return _reject(ctx, claim, cand[0], tenant_id,
                           ["golden suite or answer check configured but no vLLM replica to run "
                            "it on"], metrics, None)
        reference_name = ref[2] if ref else settings.base_model_name
        golden, answers = asyncio.run(_through_vllm(
            ctx, cand[0], cand[3], reference_name, policy.gate,
            corrected if wants_answers else []))
        metrics.update(answers)
    verdict = decide(policy.gate, metrics, golden)
    with session_scope(ctx.sessions) as s:
        _store_results(s, claim.run_id, cand[0], metrics, golden)
    if not verdict.passed:
        return _reject(ctx, claim, cand[0], tenant_id, verdict.reasons, metrics, golden, verdict.notes)
    next_state = RunState.approved if policy.approval == "auto" else RunState.awaiting_approval
    with session_scope(ctx.sessions) as s:
        runs.transition(s, claim.run_id, claim.owner, next_state, verdict=verdict.as_dict(),
                        metrics={"gate": metrics, "golden": golden})
        repo.audit(s, tenant_id=tenant_id, actor="gate", action="run.gate_passed", target_type="run",
                   target_id=str(claim.run_id), reason="; ".join(verdict.notes) or None,
                   detail={"metrics": metrics, "approval": policy.approval})
    return next_state.value


def _store_results(s, run_id, version_id, metrics: dict, golden: list[dict] | None) -> None:
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            subject = "reference" if name.endswith("_reference") else (
                "base" if name.endswith("_base") else "candidate")
            s.add(EvalResult(run_id=run_id, version_id=version_id, subject=subject, metric=name,
                             value=float(value)))
    for case in golden or []:
        s.add(EvalResult(run_id=run_id, version_id=version_id, subject="candidate",
                         metric="golden", value=1.0 if case["passed"] else 0.0,
                         passed=case["passed"], detail=case))


def _reject(ctx, claim, version_id, tenant_id, reasons, metrics, golden, notes=None) -> str:
    with session_scope(ctx.sessions) as s:
        version = repo.get_row(s, AdapterVersion, version_id)
        version.status = VersionStatus.failed.value
        version.failure_reason = "; ".join(reasons)[:2000]
        runs.transition(s, claim.run_id, claim.owner, RunState.rejected,
                        verdict={"passed": False, "reasons": reasons, "notes": notes or []},
                        metrics={"gate": metrics, "golden": golden})
        repo.audit(s, tenant_id=tenant_id, actor="gate", action="run.rejected", target_type="run",
                   target_id=str(claim.run_id), reason="; ".join(reasons)[:2000])
    return RunState.rejected.value
