"""The optimizer's Ray Serve application: the only module that touches Ray.

One deployment, ``OptimizerWorker``, runs jobs; the service calls it through a deployment
handle with streaming responses, so progress comes back while a job runs and closing the
stream cancels it. Replicas reserve fractional CPUs and autoscale on ongoing requests, so two
replicas fit a 2-core box. On a cluster the service attaches by address and either deploys the
app itself (``ray_mode=cluster``) or, under a KubeRay RayService that deploys it from
:func:`build_app`, only takes a handle to it (``ray_mode=rayservice``).
Locally Ray starts in-process on 127.0.0.1 with its files under the project's ``var/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from slmops.service import Check
from slmops_optimizer.settings import OptimizerSettings

log = logging.getLogger(__name__)
APP_NAME = "slmops-optimizer"
#: A replica sends at least this often while a job runs (a heartbeat when nothing else).
HEARTBEAT_S = 2.0
_MAX_RAY_TEMP_CHARS = 40


class OptimizerWorker:
    """A Serve replica: runs one job at a time in a thread and streams its progress."""

    def __init__(self, work_dir: str) -> None:
        from slmops.objectstore import ObjectStore
        from slmops.settings import PlatformSettings
        from slmops_optimizer.runner import JobRunner
        from slmops_optimizer.workspace import Workspace

        store = ObjectStore.from_settings(PlatformSettings())
        self.runner = JobRunner(Workspace(Path(work_dir), store))

    async def run(self, spec: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from slmops_optimizer.jobspec import JobSpec
        from slmops_optimizer.outcomes import classify

        job = JobSpec.model_validate(spec)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def progress(fraction: float, step: str) -> None:
            item = {"kind": "progress", "progress": round(fraction, 3), "step": step}
            loop.call_soon_threadsafe(updates.put_nowait, item)

        work = loop.run_in_executor(None, self.runner.run, job, progress, cancelled.is_set)
        try:
            while not work.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                pending: set[asyncio.Future[Any]] = {getter, work}
                await asyncio.wait(
                    pending, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED
                )
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
                    if not work.done():
                        yield {"kind": "heartbeat"}
            yield classify(work)
        finally:
            # The caller closed the stream (cancel, timeout, shutdown): stop at the next step.
            cancelled.set()


def _quiet_local_ray_env() -> None:
    # Keep an in-process Ray on loopback, quiet and local (no usage stats, no auth server).
    # Ray's C++ failure handler catches SIGTERM in this process and aborts it after uvicorn's
    # graceful shutdown; the service handles its own signals.
    for key, value in (
        ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_AUTH_MODE", "disabled"),
        ("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1"),
        # After shutdown, Serve's handle thread must not start a fresh, unconfigured Ray.
        ("RAY_ENABLE_AUTO_CONNECT", "0"),
    ):
        os.environ.setdefault(key, value)


# At import too: Ray reads some of these when it is first imported, and whoever imports this
# module (the service, a RayService building the app, a test) may import Ray next.
_quiet_local_ray_env()


def _shutdown_ray() -> None:
    import ray

    ray_api: Any = ray
    ray_api.shutdown()


def worker_app(settings: OptimizerSettings) -> Any:
    """The Serve application: the job deployment, sized and autoscaled from ``settings``."""
    import ray.serve

    serve: Any = ray.serve
    work_dir = settings.scratch_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    deployment = serve.deployment(OptimizerWorker).options(
        name="optimizer-worker",
        ray_actor_options={"num_cpus": settings.replica_num_cpus},
        max_ongoing_requests=settings.jobs_per_replica,
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "initial_replicas": max(1, settings.min_replicas),
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.jobs_per_replica,
            "upscale_delay_s": 1.0,
            "downscale_delay_s": 60.0,
        },
    )
    return deployment.bind(str(work_dir / "replicas"))


def build_app(args: dict[str, str]) -> Any:
    """Ray Serve application builder (``import_path: slmops_optimizer.compute:build_app``) for
    a KubeRay RayService: ``args`` are optimizer settings by field name (e.g. ``max_replicas``),
    over the ``SLMOPS_OPTIMIZER_*`` environment of the Ray pods."""
    overrides: dict[str, Any] = dict(args)  # through __init__: the environment is read too
    return worker_app(OptimizerSettings(**overrides))


def _app_handle(serve: Any, timeout_s: float) -> Any:
    """A handle to the app a RayService deployed, once it exists (it may still be starting)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return serve.get_app_handle(APP_NAME)
        except Exception:  # RayServeException: the RayService has not deployed it yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


class Compute:
    """Starts (or attaches to) Ray Serve in the background and hands out job streams."""

    first_retry_s = 2.0  # then doubling, up to 30 s

    def __init__(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        self._handle: Any = None
        self._error = "starting"
        self._ready = asyncio.Event()
        self._starter: asyncio.Task[None] | None = None
        self._started_ray = False
        self._own_temp_dir: Path | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._starter = asyncio.create_task(self._start(), name="ray serve start")

    async def _start(self) -> None:
        """Start or attach, retrying with backoff: a Ray node that timed out starting on a
        busy host, or a RayService whose head is not up yet, is not a reason to stay unready
        until someone restarts the service. Readiness says why meanwhile; jobs wait."""
        delay_s = self.first_retry_s
        while not self._stopping.is_set():
            try:
                self._handle = await asyncio.to_thread(self._start_sync)
                self._error = ""
                self._ready.set()
                return
            except Exception as exc:
                self._error = f"{type(exc).__name__}: {exc} (retrying in {delay_s:.0f} s)"
                log.exception("Ray Serve did not start; retrying in %.0f s", delay_s)
                if self.settings.ray_mode != "local-testing":
                    await asyncio.to_thread(_shutdown_ray)  # a half-started Ray would stay
                    self._started_ray = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay_s)
                delay_s = min(delay_s * 2, 30.0)

    def _start_sync(self) -> Any:
        _quiet_local_ray_env()  # before the first import of ray: some are read at import
        import ray.serve

        serve: Any = ray.serve  # Ray's decorators confuse type checkers; keep them untyped here

        settings = self.settings
        if settings.ray_mode == "local-testing":
            return serve.run(worker_app(settings), name=APP_NAME, route_prefix=None,
                             _local_testing_mode=True)  # fmt: skip
        self._init_ray()
        if settings.ray_mode == "rayservice":  # KubeRay deploys the app; only take a handle
            return _app_handle(serve, settings.ray_start_timeout_s)
        serve.start(proxy_location="Disabled")
        return serve.run(worker_app(settings), name=APP_NAME, route_prefix=None)

    def _init_ray(self) -> None:
        import ray as ray_module

        ray: Any = ray_module

        if ray.is_initialized():
            return
        if self.settings.ray_address:
            ray.init(address=self.settings.ray_address, log_to_driver=False)
            return
        ray.init(
            num_cpus=self.settings.ray_num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=self._ray_temp_dir(),
            log_to_driver=False,
        )
        self._started_ray = True

    def _ray_temp_dir(self) -> str:
        wanted = (self.settings.ray_temp_dir or self.settings.platform.var_dir / "ray").resolve()
        # Ray puts unix sockets under <temp>/session_<date>_<time>_<us>_<pid>/sockets/
        # plasma_store (64 characters more): past ~43 the socket path exceeds the kernel's
        # 108-byte limit and Ray fails obscurely (a 45-character var/ray did).
        if len(str(wanted)) <= _MAX_RAY_TEMP_CHARS:
            wanted.mkdir(parents=True, exist_ok=True)
            return str(wanted)
        short = tempfile.mkdtemp(prefix="slmops-ray-")
        log.warning("Ray temp dir %s is too long for Ray's sockets; using %s", wanted, short)
        self._own_temp_dir = Path(short)
        return short

    async def stop(self) -> None:
        self._stopping.set()  # no further start attempt; one under way may finish
        if self._starter is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._starter), 60)
        if self._started_ray:
            # Our own in-process Ray: shutting it down ends the Serve app, its controller and
            # replicas with it (serve.delete from a service shutting down on SIGTERM can block).
            await asyncio.to_thread(_shutdown_ray)
        if self._own_temp_dir is not None:
            shutil.rmtree(self._own_temp_dir, ignore_errors=True)
        # Attached to a cluster: the app stays up for the other optimizer instances (KubeRay
        # owns its lifecycle); local-testing mode has no processes to stop.

    async def check(self) -> Check:
        if self._ready.is_set():
            return Check(True, f"Ray Serve app {APP_NAME} running ({self.settings.ray_mode})")
        return Check(False, f"Ray Serve not ready: {self._error}")

    async def wait_ready(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    def stream(self, spec: dict[str, Any]) -> Any:
        """An async iterator of the job's updates (``DeploymentResponseGenerator``)."""
        return self._handle.options(stream=True).run.remote(spec)
