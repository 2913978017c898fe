"""The top ops by device time in a jax.profiler trace, as text (no TensorBoard or xprof needed).

    python bench/trace_summary.py TRACE.json.gz [--steps=N] [--top=25]

jax.profiler.trace(dir, create_perfetto_trace=True) writes, under
dir/plugins/profile/<run>/, a Chrome/Perfetto trace (perfetto_trace.json.gz, and
<host>.trace.json.gz): {"traceEvents": [...]} with metadata events naming each
process ("process_name": "/device:GPU:0", "/host:CPU", ...) and thread, and
complete events ("ph": "X", "dur" in microseconds). The summary sums the
durations of the complete events that are XLA ops, grouped by op name:

- a trace with device processes ("/device:...", GPUs and TPUs): their "XLA Ops"
  lanes where the trace has them (one event per HLO op as it ran on the device);
  else their events that name an HLO op in args.hlo_op (kernels on the stream lanes,
  each counted under its op); else every event on them (kernels by kernel name);
- a trace without device processes (the CPU backend): the host events that name an
  HLO op in args.hlo_op (XLA:CPU's thunks as its threads ran them).

Ops overlap where a backend runs them concurrently (XLA:CPU on several threads), so
the shares are of summed op time, not of wall time. Names are HLO op names
(fusion.12, convolution.3), also folded into op kinds (fusion, convolution) by
dropping the numeric suffix; args.long_name (the HLO text, where the trace has it)
gives a short description.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

_SUFFIX = re.compile(r"[.:]\d+$")


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return trace if isinstance(trace, dict) else {"traceEvents": trace}


def _names(events: list[dict]) -> tuple[dict, dict]:
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") != "M":
            continue
        if event.get("name") == "process_name":
            processes[event.get("pid")] = str(event.get("args", {}).get("name", ""))
        elif event.get("name") == "thread_name":
            threads[(event.get("pid"), event.get("tid"))] = str(event.get("args", {}).get("name", ""))
    return processes, threads


def op_events(trace: dict) -> tuple[list[dict], str]:
    """The complete events that are XLA ops on the device (see the module docstring), and which lanes."""
    events = trace.get("traceEvents", [])
    processes, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        on_device = [e for e in complete if e.get("pid") in devices]
        ops_lanes = {key for key, name in threads.items() if key[0] in devices and "XLA Ops" in name}
        if ops_lanes:
            return [e for e in on_device if (e.get("pid"), e.get("tid")) in ops_lanes], "device XLA Ops lanes"
        named = [e for e in on_device if "hlo_op" in e.get("args", {})]
        if named:
            return named, "device stream lanes (events with args.hlo_op)"
        return on_device, "device lanes (every event)"
    return [e for e in complete if "hlo_op" in e.get("args", {})], "host lanes (events with args.hlo_op: XLA:CPU)"


def _op_name(event: dict) -> str:
    args = event.get("args", {})
    return str(args.get("hlo_op") or event.get("name", "?"))


def _description(event: dict) -> str:
    args = event.get("args", {})
    text = str(args.get("long_name") or args.get("kernel_details") or "")
    if not text and args.get("hlo_op") and event.get("name") != args.get("hlo_op"):
        text = str(event.get("name", ""))  # a kernel's name, under its op
    return " ".join(text.split())[:90]


def summarize(trace: dict, *, steps: int | None = None, top: int = 25) -> str:
    """The summary text: total op time, the top ops and the top op kinds by summed duration."""
    events, lanes = op_events(trace)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    described: dict[str, str] = {}
    for event in events:
        name = _op_name(event)
        totals[name] += float(event["dur"])
        counts[name] += 1
        described.setdefault(name, _description(event))
    total_us = sum(totals.values())
    per_step = f", {total_us / 1000 / steps:.3f} ms per step over {steps} steps" if steps else ""
    lines = [
        f"XLA ops from {lanes}: {len(events)} events, {len(totals)} ops, {total_us / 1000:.3f} ms summed{per_step}",
        "",
        f"top {top} ops by summed device time",
        f"{'rank':>4} {'total_ms':>10} {'ms/step':>9} {'share':>6} {'count':>6}  op  (description)",
    ]
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    for rank, (name, micros) in enumerate(ranked[:top], 1):
        step_ms = f"{micros / 1000 / steps:9.3f}" if steps else f"{'-':>9}"
        share = micros / total_us if total_us else 0.0
        note = f"  ({described[name]})" if described.get(name) else ""
        lines.append(f"{rank:>4} {micros / 1000:10.3f} {step_ms} {share:6.1%} {counts[name]:6d}  {name}{note}")
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, micros in totals.items():
        kinds[_SUFFIX.sub("", name)] += micros
    lines += ["", "op kinds (numeric suffix dropped)", f"{'total_ms':>10} {'share':>6}  kind"]
    for kind, micros in sorted(kinds.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{micros / 1000:10.3f} {micros / total_us if total_us else 0.0:6.1%}  {kind}")
    return "\n".join(lines) + "\n"


def trimmed(trace: dict) -> dict:
    """The trace with only its metadata and the op events the summary counts: for a smaller file."""
    events, _ = op_events(trace)
    metadata = [e for e in trace.get("traceEvents", []) if e.get("ph") == "M"]
    return {"displayTimeUnit": trace.get("displayTimeUnit", "ns"), "traceEvents": metadata + events}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, default=0, help="steps the trace covers (for ms per step)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(load_trace(args.trace), steps=args.steps or None, top=args.top), end="")


if __name__ == "__main__":
    main()
