#!/usr/bin/env python3
"""Turns bench/run.sh's JSON reports into the markdown table for the README.

usage: table.py OUT LADDER MACHINE STARTUP RSS_START RSS_END COMMAND [API]
With API (realtime or live), the reports are OUT/API-callbridge-N.json, OUT/API-floor-N.json
and OUT/API-soak-250.json (+ OUT/API-soak-rss.tsv); without it, the names have no prefix.
"""
import datetime
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


API_TITLES = {
    "realtime": "OpenAI Realtime (`openai.api = \"realtime\"`)",
    "live": "GPT-Live (`openai.api = \"live\"`)",
}

FLOOR_NOTES = {
    "realtime": " Realtime floor: `session.update`, then `input_audio_buffer.append`s echoed as "
    "`response.output_audio.delta`s.",
    "live": " GPT-Live floor: `session.start` / `session.started`, `session.input_audio.append`s "
    "echoed as `session.output_audio.delta`s at real-time pace (never more than 40 ms ahead), "
    "a transcript fragment a second, a usage update every 10 s, `session.close` / "
    "`session.closed`.",
}


def main():
    out, ladder, machine, startup, rss_start, rss_end, command = sys.argv[1:8]
    api = sys.argv[8] if len(sys.argv) > 8 else None
    prefix = f"{api}-" if api else ""
    today = datetime.date.today().isoformat()
    lines = []
    if api:
        lines += [f"### {API_TITLES.get(api, api)}", ""]
    lines += [
        f"Run on {today}; machine: {machine}; command: `{command}`.",
        f"Start-up: {startup}. callbridge RSS at start {int(rss_start) / 1024:.1f} MiB, "
        f"after the ladder {int(rss_end) / 1024:.1f} MiB.",
        "",
        "| calls | frames sent | frames lost | p50 ms | p99 ms | floor p99 ms | p99 − floor ms "
        "| callbridge CPU ms per call-second | fake's CPU ms per call-second (floor run) "
        "| CPU ÷ fake's | peak RSS MiB | RSS per call KiB | floor lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ladder.split():
        cb_path = os.path.join(out, f"{prefix}callbridge-{n}.json")
        floor_path = os.path.join(out, f"{prefix}floor-{n}.json")
        if not os.path.exists(cb_path):
            lines.append(f"| {n} | (no result) |||||||||||")
            continue
        cb = load(cb_path)
        floor = load(floor_path) if os.path.exists(floor_path) else None
        p = cb.get("process") or {}
        floor_p99 = floor["latency"]["p99_ms"] if floor else float("nan")
        fcpu = ((floor or {}).get("process") or {}).get("cpu_ms_per_call_second", float("nan"))
        cpu = p.get("cpu_ms_per_call_second", float("nan"))
        lines.append(
            "| {n} | {sent} | {lost} | {p50:.2f} | {p99:.2f} | {fp99:.2f} | {d:+.2f} | {cpu:.3f} "
            "| {fcpu:.3f} | {ratio:.2f}× | {peak:.1f} | {per:.1f} | {flost} |".format(
                n=n,
                sent=cb["frames_sent"],
                lost=cb["frames_lost"] + (cb["calls"] - cb["calls_connected"]) * cb["seconds"] * 50,
                p50=cb["latency"]["p50_ms"],
                p99=cb["latency"]["p99_ms"],
                fp99=floor_p99,
                d=cb["latency"]["p99_ms"] - floor_p99,
                cpu=cpu,
                fcpu=fcpu,
                ratio=cpu / fcpu if fcpu and fcpu == fcpu else float("nan"),
                peak=p.get("rss_peak_kib", 0) / 1024,
                per=p.get("rss_per_call_kib", float("nan")),
                flost=floor["frames_lost"] if floor else "-",
            )
        )
    soak = os.path.join(out, f"{prefix}soak-250.json")
    rss = os.path.join(out, f"{prefix}soak-rss.tsv")
    if os.path.exists(soak) and os.path.exists(rss):
        s = load(soak)
        samples = [int(line.split()[1]) for line in open(rss) if line.strip()]
        if samples:
            minute = max(1, len(samples) // (s["seconds"] // 60 or 1))
            marks = samples[minute::minute][:10]
            lines += [
                "",
                f"Soak: 250 calls for {s['seconds'] // 60} min: {s['frames_lost']} frames lost, "
                f"p99 {s['latency']['p99_ms']:.2f} ms; callbridge RSS per minute (MiB): "
                + ", ".join(f"{m / 1024:.1f}" for m in marks)
                + "; {} s after the calls: {:.1f}.".format(
                    2, (s.get("process") or {}).get("rss_end_kib", samples[-1]) / 1024
                ),
            ]
    lines.append("")
    lines.append(
        "Lost = frames not echoed within 2 s after a call's last frame (a call that failed to "
        "connect counts all its frames). Latency is the round trip of every frame after each "
        "call's first second. Floor = the simulator talking to fake-openai directly; the fake's "
        "CPU is measured in that run, so \"CPU ÷ fake's\" compares callbridge with a bare "
        "tokio-tungstenite echo doing half its messages, on the same machine in the same run."
        + FLOOR_NOTES.get(api or "", "")
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
