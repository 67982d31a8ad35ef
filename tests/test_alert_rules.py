"""integrations/prometheus/alerts.yml: well-formed rules, and every pneumoscan metric they
name is one the service exports (a renamed metric would otherwise silence its alert)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent.parent / "integrations" / "prometheus" / "alerts.yml"


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_rule_is_complete() -> None:
    found = rules()
    assert len(found) >= 10
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    for rule in found:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")


def test_every_metric_named_is_exported(client, pneumoscan_metrics_text: str) -> None:
    exported = set(re.findall(r"^# TYPE (\w+)", pneumoscan_metrics_text, re.MULTILINE))
    histograms = {
        name for name in exported if f"# TYPE {name} histogram" in pneumoscan_metrics_text
    }
    for rule in rules():
        for name in re.findall(r"\b(pneumoscan_\w+)", rule["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or base in histograms or base + "_total" in exported, (
                rule["alert"],
                name,
            )
            # the labels a rule filters on are the metric's own
            for labels in re.findall(rf"{name}\{{([^}}]*)\}}", rule["expr"]):
                for label in re.findall(r"(\w+)\s*[=!~]", labels):
                    assert re.search(
                        rf"^{base}\w*\{{[^}}]*\b{label}=", pneumoscan_metrics_text, re.MULTILINE
                    ), (rule["alert"], name, label)


import pytest  # noqa: E402


@pytest.fixture
def pneumoscan_metrics_text(client, monkeypatch: pytest.MonkeyPatch) -> str:
    """/metrics after a DICOM prediction, a read and a refused upload, so that every labelled
    series has a sample; with a certificate expiry and a CRL's next update, as `pneumoscan serve`
    over mutual TLS with a CRL has."""
    from app import tls
    from tests.conftest import fixture_bytes

    monkeypatch.setitem(tls.expiry, "server", 2e9)
    monkeypatch.setattr(tls.watch, "crl_next_update", 2e9)

    made = client.post(
        "/predict", files={"file": ("x.dcm", fixture_bytes("dicom/person1946_bacteria_4874.dcm"))}
    ).json()
    client.put(f"/predictions/{made['prediction_id']}/reading", json={"label": "NORMAL"})
    client.post("/predict", files={"file": ("x", b"not an image")})
    client.app.state.services.metrics.rejected.labels("test").inc()
    return client.get("/metrics").text
