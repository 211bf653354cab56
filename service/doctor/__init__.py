"""Autoscaling doctor: checks that every metric a loraserve HPA scales on is actually served by the cluster's
custom/external metrics APIs, and explains why scaling would otherwise stall silently.

``python -m service.doctor --help``. Needs the ``doctor`` extra (the ``kubernetes`` client).
"""
