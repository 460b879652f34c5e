"""Prometheus metrics of the daemon (`serve --metrics HOST:PORT`): collector.py turns the
daemon's state into metric families at scrape time, server.py serves /metrics."""
