"""schemathesis against the app's own OpenAPI schema, over real HTTP, with a valid key:
whatever the schema lets a client send, the service never answers 5xx."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from benchmarks.common import BENCH_KEY, running_server


def test_no_server_errors_for_any_schema_valid_request(tiny_store: Path, tmp_path: Path) -> None:
    with running_server(tiny_store, tmp_path / "data") as server:
        schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {
            "/predict",
            "/explain/{prediction_id}",
            "/models",
            "/readyz",
        }
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=20,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def check(case) -> None:
                case.call_and_validate(
                    headers={"X-API-Key": BENCH_KEY}, checks=[not_a_server_error]
                )

            check()
