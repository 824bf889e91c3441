"""The policy in effect for an alias, through a real API process (ops only, per tenant) and the
CLI, from a policy directory with a default, an alias file and a tenant-specific file."""

from __future__ import annotations

import uuid

import httpx
import pytest
import yaml

from service.domain.policy import PolicyStore
from tests.helpers.auth import bearer
from tests.helpers.cli import flywheel
from tests.helpers.stack import api_with

TENANT = f"t-pol-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    (d / "default.yaml").write_text("trigger: {min_new_ratings: 40}\n"
                                    "export: {fallback: true}\n")
    (d / "bot.yaml").write_text(f"tenants: [{TENANT}]\ntrigger: {{min_new_ratings: 25}}\n"
                                "approval: auto\n")
    (d / f"{TENANT}--bot.yaml").write_text("trigger: {min_new_ratings: 7}\n")
    return d


@pytest.fixture(scope="module")
def policy_api(api_settings, policy_dir, stack_root):
    with api_with(api_settings, stack_root / "api-policy.log", policy_dir=str(policy_dir)) as proc:
        yield proc


def test_ops_see_the_merged_policy_and_its_files(policy_api, make_key, make_alias):
    ops = make_key(TENANT, "ops")
    make_alias(TENANT, "bot")
    make_alias(TENANT, "faq")
    with httpx.Client(base_url=policy_api.url, timeout=30, headers=bearer(ops)) as c:
        own = c.get("/v1/adapters/bot/policy")
        assert own.status_code == 200, own.text
        body = own.json()
        # The tenant's own file wins over bot.yaml, which wins over default.yaml; the rest of
        # each file still applies.
        assert body["sources"] == ["default.yaml", f"{TENANT}--bot.yaml"]
        assert body["policy"]["trigger"]["min_new_ratings"] == 7
        assert body["policy"]["export"]["fallback"] is True
        assert body["policy"]["approval"] == "manual"  # bot.yaml is not merged in under it
        faq = c.get("/v1/adapters/faq/policy").json()
        assert faq["sources"] == ["default.yaml"] and faq["policy"]["trigger"]["min_new_ratings"] == 40
        assert c.get("/v1/adapters/nope/policy").status_code == 404


def test_policy_is_ops_only_and_per_tenant(policy_api, make_key, make_alias, tenant):
    make_alias(TENANT, "bot")
    product = make_key(TENANT, "product")
    other_ops = make_key(tenant, "ops")
    with httpx.Client(base_url=policy_api.url, timeout=30) as c:
        assert c.get("/v1/adapters/bot/policy").status_code == 401
        assert c.get("/v1/adapters/bot/policy", headers=bearer(product)).status_code == 403
        r = c.get("/v1/adapters/bot/policy", headers=bearer(other_ops))
        assert r.status_code == 404 and r.json()["error"]["param"] == "alias"


def test_another_tenants_alias_of_the_same_name_never_takes_the_shared_file(policy_api, make_key,
                                                                            make_alias, tenant):
    ops = make_key(tenant, "ops")
    make_alias(tenant, "bot")
    with httpx.Client(base_url=policy_api.url, timeout=30, headers=bearer(ops)) as c:
        body = c.get("/v1/adapters/bot/policy").json()
    # bot.yaml names only TENANT: this tenant's bot runs (and sees) the default alone.
    assert body["sources"] == ["default.yaml"]
    assert body["policy"]["approval"] == "manual"
    assert body["policy"]["trigger"]["min_new_ratings"] == 40


def test_cli_shows_the_same_policy(cli_env, policy_dir):
    r = flywheel(cli_env, "policies", "show", "bot", "--tenant", TENANT, policy_dir=str(policy_dir))
    assert r.returncode == 0, r.stderr
    header, _, text = r.stdout.partition("\n")
    assert f"default.yaml + {TENANT}--bot.yaml" in header
    shown = yaml.safe_load(text)
    assert shown == PolicyStore(policy_dir).for_alias("bot", TENANT).model_dump(mode="json")
    plain = flywheel(cli_env, "policies", "show", "bot", policy_dir=str(policy_dir))
    assert "default.yaml + bot.yaml" in plain.stdout.splitlines()[0]
    assert yaml.safe_load(plain.stdout.partition("\n")[2])["approval"] == "auto"


def test_cli_show_names_a_bad_policy_file(cli_env, tmp_path):
    (tmp_path / "default.yaml").write_text("trigger: {min_new_ratings: -1}\n")
    r = flywheel(cli_env, "policies", "show", "bot", policy_dir=str(tmp_path))
    assert r.returncode == 1
    assert "default.yaml" in r.stderr and "min_new_ratings" in r.stderr
