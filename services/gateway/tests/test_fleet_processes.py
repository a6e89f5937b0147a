"""A simulated fleet in processes of its own (`slmops_gateway.fleetprocesses`): requests it
cannot run are refused with the reason before any process starts, and a part that cannot run
fails the fleet's start with its reason, leaving no process behind. The fleet at work in
processes: tests/pipeline/test_fleet_cli.py and test_demo.py."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from slmops.auth import BearerToken, BearerTokenFile
from slmops.fleetsim import FleetRequest, FleetSimulationError
from slmops.settings import PlatformSettings
from slmops.testing.ports import free_port
from slmops_gateway.fleetprocesses import FleetProcesses, part_specs


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (FleetRequest(count=2, processes=3), "3 processes for 2 gateways"),
        (FleetRequest(count=2, processes=0), "processes must be at least 1"),
        (FleetRequest(count=2, reports="pigeon"), "not 'pigeon'"),
        (FleetRequest(count=2, faults={"gremlins": 0.1}), "unknown faults"),
        (FleetRequest(count=2, registry_auth=BearerToken("t")), "from a token file"),
    ],
)
def test_a_request_it_cannot_run_is_refused_with_the_reason(
    request_: FleetRequest, reason: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=reason):
        FleetProcesses(request_, PlatformSettings(var_dir=tmp_path))


def test_each_part_simulates_its_own_share_of_one_layout() -> None:
    request = FleetRequest(count=7, processes=3, prefix="p", reports="relay")
    specs = part_specs(request)
    mine = [[i for i in range(7) if i % spec.parts == spec.part] for spec in specs]
    assert mine == [[0, 3, 6], [1, 4], [2, 5]]
    assert [spec.site for spec in specs] == ["fleetsim-p-0", "fleetsim-p-1", "fleetsim-p-2"]
    assert all(spec.relay and not spec.site_reports for spec in specs)


async def test_a_part_that_cannot_reach_nats_fails_the_start_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    platform = PlatformSettings(nats_url=f"nats://127.0.0.1:{free_port()}", var_dir=tmp_path)
    token = tmp_path / "simulator.jwt"
    token.write_text("not needed: the parts never get as far as the registry")
    fleet = FleetProcesses(
        FleetRequest(count=4, processes=2, registry_auth=BearerTokenFile(token)), platform
    )
    with pytest.raises(FleetSimulationError, match=r"fleet part [01]: ConnectionError: no NATS"):
        await fleet.start()
    pids = fleet.pids
    await fleet.stop()
    assert len(pids) == 2
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)  # fmt: skip
