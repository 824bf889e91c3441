"""service.metrics_redact: no tenant, alias or version reaches an unauthenticated scraper."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics_redact import tenant_free


def test_private_labels_are_summed_away_and_per_alias_gauges_dropped():
    reg = CollectorRegistry()
    chats = Counter("fw_chats", "chats", ["alias", "code"], registry=reg)
    chats.labels("acme-bot", "200").inc(3)
    chats.labels("globex-bot", "200").inc(4)
    chats.labels("globex-bot", "500").inc()
    lat = Histogram("fw_latency_seconds", "latency", ["alias", "version"], buckets=(0.1, 1.0),
                    registry=reg)
    lat.labels("acme-bot", "acme--acme-bot--v1").observe(0.05)
    lat.labels("globex-bot", "globex--globex-bot--v3").observe(0.5)
    Gauge("fw_training_seconds", "per alias", ["tenant", "alias"], registry=reg).labels(
        "acme", "acme-bot").set(12)
    Gauge("flywheel_feedback_buffer", "waiting", ["tenant", "alias"], registry=reg).labels(
        "acme", "acme-bot").set(5)
    Gauge("fw_up", "no private labels", ["replica"], registry=reg).labels("http://v:8100").set(1)

    text = tenant_free(generate_latest(reg).decode())
    assert "acme" not in text and "globex" not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert {(s.labels["code"], s.value) for s in fams["fw_chats"].samples} == {("200", 7.0), ("500", 1.0)}
    buckets = {s.labels.get("le"): s.value for s in fams["fw_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1.0, "1.0": 2.0, "+Inf": 2.0}
    assert "fw_training_seconds" not in fams  # a duration summed over aliases means nothing
    assert fams["flywheel_feedback_buffer"].samples[0].value == 5.0
    assert fams["fw_up"].samples[0].labels == {"replica": "http://v:8100"}


def test_resident_versions_are_counted_per_replica_and_role_without_names():
    reg = CollectorRegistry()
    resident = Gauge("flywheel_resident_versions", "resident",
                     ["replica", "tenant", "alias", "version", "role"], registry=reg)
    for tenant, role in (("acme", "live"), ("globex", "live"), ("acme", "warm")):
        resident.labels("http://10.0.0.2:8100", tenant, f"{tenant}-bot",
                        f"{tenant}--{tenant}-bot--{role}", role).set(1)
    text = tenant_free(generate_latest(reg).decode())
    assert "acme" not in text and "globex" not in text
    [fam] = [f for f in text_string_to_metric_families(text) if f.name == "flywheel_resident_versions"]
    assert {(s.labels["replica"], s.labels["role"], s.value) for s in fam.samples} == {
        ("http://10.0.0.2:8100", "live", 2.0), ("http://10.0.0.2:8100", "warm", 1.0)}
