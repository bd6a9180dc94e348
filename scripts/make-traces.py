#!/usr/bin/env python3
"""Writes the example traces in contrib/traces/ for `autoscaler simulate` (deterministic).

spike.csv: three web servers for an hour at 25-35 % busy; from 0:15 to 0:30 a burst takes them
           to about 90 %.
daily.csv: three web servers over 24 hours, one row a minute: quiet nights (about 15 %), a
           morning ramp, an afternoon plateau around 80 % and an evening decline.
Both are synthetic, shaped like what a small site records; replace them with your own
(`sar`, Prometheus node_cpu_seconds_total, CloudWatch CPUUtilization exported to CSV).
"""
import math
import os
import random

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "contrib", "traces")
NODES = ["web-1", "web-2", "web-3"]


def clamp(v):
    return max(0.0, min(100.0, v))


def spike(rng):
    rows = []
    for t in range(0, 3601, 15):
        base = 30.0
        if 900 <= t < 1800:
            base = 90.0
        elif 840 <= t < 900:
            base = 30.0 + (t - 840) / 60 * 60.0
        elif 1800 <= t < 1860:
            base = 90.0 - (t - 1800) / 60 * 60.0
        for i, n in enumerate(NODES):
            rows.append((t, n, clamp(base + (i - 1) * 2.0 + rng.gauss(0, 3.0))))
    return rows


def daily(rng):
    rows = []
    for m in range(0, 24 * 60 + 1):
        h = m / 60.0
        # Night floor 15 %, a smooth day curve peaking near 14:00.
        day = max(0.0, math.sin(math.pi * (h - 6.0) / 16.0)) if 6.0 <= h <= 22.0 else 0.0
        base = 15.0 + 68.0 * day ** 1.5
        for i, n in enumerate(NODES):
            rows.append((m * 60, n, clamp(base + (i - 1) * 3.0 + rng.gauss(0, 4.0))))
    return rows


def write(name, rows, what):
    with open(os.path.join(HERE, name), "w") as f:
        f.write(f"# {what}\n# Made by scripts/make-traces.py.\ntime,node,busy\n")
        for t, n, b in rows:
            f.write(f"{t},{n},{b:.1f}\n")


if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    write("spike.csv", spike(random.Random(7)), "Three web servers, one hour; a burst from 0:15 to 0:30.")
    write("daily.csv", daily(random.Random(11)), "Three web servers, one day, one row a minute.")
