"""No usage data leaves the machine by default: Flower telemetry, Ray usage statistics and the HF Hub's telemetry are
off in layerprune's process and in the processes of a Flower simulation (Ray actors), unless the user turns them on."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from layerprune.privacy import OFF, disable_telemetry

pytest.importorskip("flwr")
pytest.importorskip("ray")


def test_switches_are_set_unless_the_user_set_them():
    env = {"FLWR_TELEMETRY_ENABLED": "1"}  # the user asked for Flower telemetry
    set_now = disable_telemetry(env)
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert "FLWR_TELEMETRY_ENABLED" not in set_now


# A Flower simulation whose client reports the telemetry switches its own process sees (a Ray actor). layerprune is
# imported first, as every layerprune entry point does; the parent's environment has none of the variables.
_SIM = textwrap.dedent("""
    import json, os, sys, time
    import layerprune  # noqa: F401  (switches telemetry off)
    from flwr.app import Context, Message, MetricRecord, RecordDict, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation
    import flwr.supercore.telemetry as flwr_telemetry

    KEYS = ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED", "HF_HUB_DISABLE_TELEMETRY")
    client, server = ClientApp(), ServerApp()
    seen = {}

    @client.query()
    def report(msg: Message, ctx: Context):
        codes = {k: {"0": 0, "1": 1}.get(os.environ.get(k), -1) for k in KEYS}
        return Message(RecordDict({"m": MetricRecord({**codes, "pid": os.getpid()})}), reply_to=msg)

    @server.main()
    def main(grid: Grid, ctx: Context):
        nodes = []
        for _ in range(600):  # the simulation registers its nodes shortly after the ServerApp starts
            nodes = list(grid.get_node_ids())
            if len(nodes) == 2:
                break
            time.sleep(0.1)
        msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
        for r in grid.send_and_receive(msgs):
            seen.setdefault("clients", []).append(dict(r.content["m"]))

    run_simulation(server, client, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "logging_level": "error"}})
    seen["driver"] = {k: os.environ.get(k) for k in KEYS}
    seen["flwr_module"] = flwr_telemetry.FLWR_TELEMETRY_ENABLED
    seen["driver_pid"] = os.getpid()
    print("RESULT " + json.dumps(seen))
""")


def test_flower_simulation_processes_run_with_telemetry_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in OFF}
    env.update(OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    r = subprocess.run([sys.executable, "-c", _SIM], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    import json
    seen = json.loads(line[-1][len("RESULT "):])
    assert seen["driver"] == OFF and seen["flwr_module"] == "0"
    clients = seen.get("clients", [])
    assert len(clients) == 2
    for c in clients:
        assert c["pid"] != seen["driver_pid"]  # the client ran in another process (a Ray actor)
        assert c["FLWR_TELEMETRY_ENABLED"] == 0 and c["RAY_USAGE_STATS_ENABLED"] == 0
        assert c["HF_HUB_DISABLE_TELEMETRY"] == 1
