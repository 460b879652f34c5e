"""The names `vhost-pv serve` has always imported from here, while callers move over.

The daemon is composed in vhost_pv.app (App), configured by vhost_pv.config; its volume
domain is vhost_pv.service.volumes, vhost-user admission vhost_pv.service.frontends and
the control commands vhost_pv.control.handlers."""

from __future__ import annotations

from vhost_pv.app import App
from vhost_pv.config import ConfigError, DaemonConfig

Daemon = App

__all__ = ["ConfigError", "Daemon", "DaemonConfig"]
