"""Dangling-volume guards, alerts and (later) container watchers."""
