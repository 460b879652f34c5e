"""The daemon's domain services: the served volumes (volumes.py) and vhost-user admission (frontends.py)."""
