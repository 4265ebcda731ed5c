"""Property-based run of the admin REST API from its own OpenAPI schema (Schemathesis) against a
live coordinator process: no 5xx on any operation, and every documented response matches its
schema. Bounded: a few examples per operation, so the run stays well under a minute."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_stack import Live
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

EXAMPLES = 8  # per operation


@pytest.fixture(scope="module")
def schema(live: Live) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{live.http_port}/openapi.json")


def test_every_operation_fuzzed_from_the_schema(live: Live, schema: Any) -> None:
    auth = {"Authorization": live.http.headers["Authorization"]}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    for op in operations:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            case.call_and_validate(
                base_url=f"http://127.0.0.1:{live.http_port}",
                headers=auth,
                checks=[not_a_server_error, response_schema_conformance],
                timeout=30,
            )

        try:
            run()
        except Exception as e:  # collect every operation's failure, not just the first
            failures.append(f"{op.label}: {e}")
    assert not failures, "\n\n".join(failures)
