"""`slmops fleet health` when the telemetry service is not there: what to do, not a traceback
(the table itself is checked against the real service in tests/telemetry/)."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from slmops.cli.main import app


def test_fleet_health_says_how_to_start_the_telemetry_service() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"

    result = CliRunner().invoke(
        app, ["fleet", "health", "minilm", "1.0.0", "--telemetry-url", closed],
        env={"COLUMNS": "200"},
    )  # fmt: skip

    assert result.exit_code == 1
    assert f"telemetry service not reachable at {closed}" in result.output
    assert "SLMOPS_TELEMETRY_URL" in result.output
