#!/usr/bin/env python3
"""scripts/pipewire_joins.py: PipeWire's round trip over cold joins, at network latency 0, 1 and 2.

For each L, five times: the bridge started afresh on a headless PipeWire of its own, a NETJACK2 slave
(`jackd -d net -l L`, a direct loop) started in a network namespace of its own (a veth pair, no route
out), the round trip measured with `archdsp-virt latency --measure` (3 s), the slave stopped. Prints
one line per join (frames, readings, cycles PipeWire replayed, late packets dropped, manager restarts,
the receive queue and its bound) and the frames per L as JSON at the end. About three minutes.

    sudo /opt/archdsp-libvirt/venv/bin/python scripts/pipewire_joins.py  # the venv of scripts/install-test-deps

The suite's tests/test_real_pipewire.py provides the namespace, the PipeWire and the slave.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from conftest import archdsp  # noqa: E402
from test_real_pipewire import Slave, env, measure, status, wait  # noqa: E402,F401 - env is the fixture

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


if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(TESTS), __file__]))
