"""What turns a volume dangling, and who is told.

guard.py runs one guard thread per volume (once it dangles: seal, alerts, time limit);
containers.py makes volumes follow their containers through engine events (engine_api.py,
engine_events.py), reconciliation and kernel process events (procevents.py, processes.py),
and lets a labelled new container reclaim a volume; alerts.py delivers alerts to the log,
the control socket's subscribers and an Alertmanager webhook.
"""
