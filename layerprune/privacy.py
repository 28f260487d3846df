"""Nothing leaves the user's machine unless the user says so.

Some libraries layerprune uses report usage to their authors by default: Flower's telemetry (``layerprune fed``),
Ray's usage statistics (Ray search workers, Flower's simulation engine) and the Hugging Face Hub's telemetry. Each
reads its switch from the environment when it is first imported, and Ray's worker processes inherit the driver's
environment, so the switches are set here, when ``layerprune`` is imported, before any of those libraries is.
A user who wants to share usage data sets the variable themselves (e.g. ``FLWR_TELEMETRY_ENABLED=1``); a value
already in the environment is never overridden.
"""
from __future__ import annotations

import os

OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",   # Flower: telemetry events to Flower's servers
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray: usage statistics reports
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub: telemetry on downloads
}


def disable_telemetry(env=os.environ) -> dict[str, str]:
    """Switch every known usage report off in ``env`` unless the user set its variable. Returns what was set."""
    set_now = {k: v for k, v in OFF.items() if k not in env}
    env.update(set_now)
    return set_now
