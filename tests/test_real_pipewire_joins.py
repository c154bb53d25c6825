"""PipeWire's round trip over cold joins, at network latency 0, 1 and 2: a measurement, not a check.

For each L, five times: the bridge started afresh on a headless PipeWire of its own, a NETJACK2 slave
(`jackd -d net -l L`, a direct loop) started in a network namespace of its own (a veth pair, no route
out), the round trip measured with `archdsp-virt latency --measure` (3 s), the slave stopped. Prints
one line per join (frames, readings, cycles PipeWire replayed, late packets dropped, manager restarts,
the receive queue and its bound) and the frames per L as JSON at the end. About three minutes, so it
runs only when asked:

    sudo ARCHDSP_PIPEWIRE_JOINS=1 /opt/archdsp-libvirt/venv/bin/python -m pytest -s -m real tests/test_real_pipewire_joins.py

It uses tests/test_real_pipewire.py's namespace, PipeWire and slave (the module's fixture and helpers).
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from conftest import archdsp
from test_real_pipewire import Slave, env, measure, pytestmark, status, wait  # noqa: F401 - env is the fixture

pytestmark = [*pytestmark, pytest.mark.skipif(os.environ.get("ARCHDSP_PIPEWIRE_JOINS") != "1",
                                              reason="a three-minute measurement: ARCHDSP_PIPEWIRE_JOINS=1 runs it")]

JOINS = 5


def test_round_trip_over_cold_joins(env):  # noqa: F811 - the fixture imported above
    cfg, out = env["cfg"], {}
    for lat in (0, 1, 2):
        cfg.write_text(re.sub(r"network_latency = \d+", f"network_latency = {lat}", cfg.read_text()))
        out[lat] = []
        for j in range(JOINS):
            archdsp("netjack", "stop", str(cfg), env=env["env"], timeout=60)
            r = archdsp("netjack", "start", str(cfg), env=env["env"], timeout=60)
            assert r.returncode == 0, r.stderr
            slave = Slave(env["base"], latency=lat)
            try:
                wait(env, lambda i: i["link"] == "up" and any(q["bound"] for q in i["queues"]), timeout=60)
                slave.loop()
                wait(env, lambda i: len(i["ports"]) == 4)
                rep = measure(env, 3, lat)
                out[lat].append(rep["measured_frames"])
                st = status(env)
                print(f"L={lat} join {j}: {rep['measured_frames']} frames, readings {sorted(set(rep['readings']))}, "
                      f"replayed {rep['replayed_cycles']}, dropped {rep['dropped_packets']}, manager restarts "
                      f"{st['manager_restarts']}, queue/bound {[(q['queued'], q['bound']) for q in st['queues']]}",
                      flush=True)
            finally:
                slave.stop()
            time.sleep(1)
    print(json.dumps(out))

