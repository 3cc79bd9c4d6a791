#!/usr/bin/env python3
"""bench/ab.sh's JSON reports as a markdown table: every figure beside the floor of its N."""
import datetime
import json
import os
import sys


def main():
    out, ladder, machine, command = sys.argv[1:5]
    print(f"Run on {datetime.date.today().isoformat()}; machine: {machine}; command: `{command}`.")
    print()
    print("| calls | run | lost | p50 ms | p99 ms | p99 − floor ms | CPU ms per call-second "
          "| CPU ÷ fake's | peak RSS MiB | RSS per call KiB | RSS 3 s after MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in ladder.split():
        floor = json.load(open(os.path.join(out, f"floor-{n}.json")))
        fcpu = floor["process"]["cpu_ms_per_call_second"]
        fp99 = floor["latency"]["p99_ms"]
        print(f"| {n} | floor (fake) | {floor['frames_lost']} | {floor['latency']['p50_ms']:.2f} "
              f"| {fp99:.2f} | – | {fcpu:.3f} | 1 | | | |")
        for who in ("before", "after"):
            path = os.path.join(out, f"{who}-{n}.json")
            if not os.path.exists(path):
                continue
            r = json.load(open(path))
            p = r["process"]
            lost = r["frames_lost"] + (r["calls"] - r["calls_connected"]) * r["seconds"] * 50
            print(f"| {n} | {who} | {lost} | {r['latency']['p50_ms']:.2f} "
                  f"| {r['latency']['p99_ms']:.2f} | {r['latency']['p99_ms'] - fp99:+.2f} "
                  f"| {p['cpu_ms_per_call_second']:.3f} | {p['cpu_ms_per_call_second'] / fcpu:.2f}× "
                  f"| {p['rss_peak_kib'] / 1024:.1f} | {p['rss_per_call_kib']:.1f} "
                  f"| {p['rss_end_kib'] / 1024:.1f} |")
    print()
    print("Floor = the simulator talking to fake-openai directly (a bare tokio-tungstenite echo "
          "with one socket per call, half the messages of a bridge); its CPU and p99 are from the "
          "same N, minutes apart.")


if __name__ == "__main__":
    main()
