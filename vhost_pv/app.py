"""The composition root: build the daemon's parts from its config, start them in order,
stop them in reverse, and turn signals into a stop or a reload. Nothing else lives here:
the volume domain is service/volumes.py, vhost-user admission service/frontends.py, the
control commands control/handlers.py."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from vhost_pv import seccomp
from vhost_pv.config import DaemonConfig
from vhost_pv.control import handlers
from vhost_pv.control.server import ControlServer
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.guard.containers import EngineWatcher, ProcessWatcher
from vhost_pv.handover import handover
from vhost_pv.meta.store import MetadataStore
from vhost_pv.service.frontends import FrontendService, MetadataFsFrontend
from vhost_pv.service.runtime import RuntimeVolumes
from vhost_pv.service.volumes import VolumeService
from vhost_pv.sockfile import raise_fd_limit, watch_task
from vhost_pv.supervision import Supervision

if TYPE_CHECKING:
    from vhost_pv.guard.engine_api import EngineClient
    from vhost_pv.meta.fuse import FuseFileSystem
    from vhost_pv.meta.http_server import MetadataHttpServer
    from vhost_pv.metrics.server import MetricsServer

# The daemon's log name, whichever module writes: operators (and tests) match on it.
log = logging.getLogger("vhost_pv.daemon")


class App:
    def __init__(self, config: DaemonConfig) -> None:
        config.validate()
        self.config = config
        self.alerts = AlertHub(config.alert_webhook)
        self.engine: EngineClient | None = None
        if config.engine_url:
            from vhost_pv.guard.engine_api import EngineClient  # aiohttp: only when used

            self.engine = EngineClient(config.engine_url)
        self.frontends = FrontendService(config, self.alerts)
        self.volumes = VolumeService(config, self.alerts, engine=self.engine,
                                     describe_source=self.frontends.sources.describe)
        # The store exists from the start, whether or not anything serves it to the guest.
        self.metadata = MetadataStore(config.vm, self.volumes.volume_metadata)
        self.volumes.on_change = self.metadata.touch
        self.meta_http: MetadataHttpServer | None = None
        self.metrics: MetricsServer | None = None
        self.meta_fs: FuseFileSystem | None = None
        self._meta_frontend: MetadataFsFrontend | None = None
        self.engine_watcher = (
            EngineWatcher(self.engine, self.volumes, reconcile_interval=config.reconcile_interval,
                          reclaim_policy=config.reclaim_policy, stop_poll=config.stop_poll)
            if self.engine is not None else None
        )
        self.process_watcher = (
            ProcessWatcher(self.volumes, arbiter=self.engine_watcher, grace=config.engine_grace)
            if config.proc_events else None
        )
        self.volumes.process_watcher = self.process_watcher
        self.runtime = RuntimeVolumes(config, self.volumes, self.frontends)
        self.control = ControlServer(
            config.control_path,
            config.control_access,
            handlers.table(handlers.Context(self.volumes, self.alerts, self.metadata, self.status,
                                            runtime=self.runtime)),
            timeout=config.peer_timeout,
        )
        self.supervision = Supervision(self.volumes, stuck_after=config.worker_stuck_after)
        self._watcher_tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.started_at = time.time()

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        # Unhandled, SIGHUP would end the daemon silently (e.g. its terminal closing).
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        # The control socket answers: READY=1, then STATUS and watchdog pings (supervision.py).
        self.supervision.ready()
        supervising = watch_task(asyncio.create_task(self.supervision.run(), name="supervision"), log)
        try:
            await self._stopping.wait()
        finally:
            self.supervision.stopping()
            supervising.cancel()
            await asyncio.gather(supervising, return_exceptions=True)
            await self.stop()

    async def start(self) -> None:
        self.alerts.bind_loop(asyncio.get_running_loop())
        raise_fd_limit(log)
        # Before any queue worker can start: each installs the filter of this mode on itself.
        seccomp.apply(self.config.seccomp)
        seccomp.log_mode(log, self.config.seccomp)
        try:
            await self._start()
        except BaseException:
            # Whatever was created so far goes: no stale sockets, locks or guard threads.
            await self.stop()
            raise

    def reload(self) -> None:
        """SIGHUP: reload what can be reloaded, between RELOADING=1 and READY=1."""
        self.supervision.reloading()
        try:
            self._reload()
        finally:
            self.supervision.reloaded()

    def _reload(self) -> None:
        """The metadata policy file."""
        if self.config.meta_policy is None or self.meta_fs is None:
            log.info("SIGHUP: nothing to reload (no --meta-policy)")
            return
        from vhost_pv.meta.policy import Policy

        try:
            self.meta_fs._policy = Policy.load(self.config.meta_policy)  # read per request: takes effect now
        except Exception as exc:  # a bad edit must not take the daemon down: keep the old one
            log.error("SIGHUP: cannot reload %s, keeping the policy in force: %s",
                      self.config.meta_policy, exc)
            return
        log.info("SIGHUP: metadata policy reloaded from %s", self.config.meta_policy)

    async def _start(self) -> None:
        handover().load()  # listeners passed by the service manager, before anything listens
        self.config.socket_dir.mkdir(parents=True, exist_ok=True)
        self.runtime.start()
        if self.volumes.failed and not self.volumes.served and self.config.state_dir is None:
            # Volumes were named and none can be served: a mistake on the command line, said
            # at once. With --state-dir the daemon is a service whose set is managed at runtime
            # (the disk may come back, the admin removes or adds): it starts regardless.
            raise ValueError("no volume can be served: " + "; ".join(
                f"{failure['path']}: {failure['error']}" for failure in self.volumes.failed))
        if self.config.meta_http is not None:
            from vhost_pv.meta.http_server import MetadataHttpServer  # aiohttp.web: only when used

            host, port = self.config.meta_http
            meta_http = MetadataHttpServer(self.metadata, self.alerts.raise_alert, host, port,
                                           idle_timeout=self.config.peer_timeout)
            await meta_http.start()
            self.meta_http = meta_http
        if self.config.meta_socket is not None:
            from vhost_pv.meta.fuse import FuseFileSystem
            from vhost_pv.meta.policy import Policy

            policy = Policy.load(self.config.meta_policy) if self.config.meta_policy else Policy.default()
            self.meta_fs = FuseFileSystem(self.metadata, policy)
            self._meta_frontend = MetadataFsFrontend(
                self.config.meta_socket, self.meta_fs, vm=self.config.vm,
                access=self.config.control_access, peer_timeout=self.config.peer_timeout)
            self._meta_frontend.start()
        if self.config.metrics is not None:
            await self._start_metrics(*self.config.metrics)
        # The control socket comes last: once it answers, everything else is up.
        await self.control.start()
        handover().drop_unclaimed()
        if self.process_watcher is not None:
            await self.process_watcher.start()
        if self.engine_watcher is not None:
            task = watch_task(asyncio.create_task(self.engine_watcher.run(), name="engine-watcher"), log)
            self._watcher_tasks.append(task)

    async def _start_metrics(self, host: str, port: int) -> None:
        from vhost_pv.metrics import collector  # prometheus_client: only when used
        from vhost_pv.metrics.server import MetricsServer

        metrics = MetricsServer(lambda: collector.snapshot(self), host, port,
                                idle_timeout=self.config.peer_timeout)
        await metrics.start()
        self.metrics = metrics

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """In reverse of _start; safe after a start that failed half way."""
        for task in self._watcher_tasks:
            task.cancel()
        # A watcher that died has been logged already: shutting down must go on.
        await asyncio.gather(*self._watcher_tasks, return_exceptions=True)
        if self.process_watcher is not None:
            self.process_watcher.close()
        if self.meta_http is not None:
            await self.meta_http.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self._meta_frontend is not None:
            await self._meta_frontend.close()
        await self.control.close()
        await self.volumes.close()
        self.runtime.close()
        self.alerts.close()
        log.info("stopped")

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "seccomp": seccomp.current().value,
            "volumes": self.volumes.status(),
            "failed": list(self.volumes.failed),
            "served_set": self.runtime.describe(),
            "alerts": {"by_kind": dict(self.alerts.counts), "subscribers": self.alerts.subscriber_count,
                       "webhook_failures": self.alerts.webhook_failures},
            "metadata": {
                "vm": self.config.vm,
                "http": f"{self.meta_http.host}:{self.meta_http.port}" if self.meta_http else None,
                "http_refused": self.meta_http.refused if self.meta_http else 0,
                "version": self.metadata.version,
            },
            "metrics": f"{self.metrics.host}:{self.metrics.port}" if self.metrics else None,
            "watchers": {
                "engine": self.engine_watcher.describe() if self.engine_watcher else None,
                "proc_events": self.process_watcher.describe() if self.process_watcher else None,
            },
        }
