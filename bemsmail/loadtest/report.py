"""Matching what the mock providers received to the mail the load test created, and the figures, files and
tables made from it. Pure functions but for the writers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Mail:
    item_id: str
    mailbox: str
    created_at: float  # epoch seconds, taken just before the mock was asked to create it


@dataclass(frozen=True, slots=True)
class Received:
    """One request a mock provider received: which device, what it answered, when, and the push's data."""

    token: str
    status: int | None
    reason: str
    at: float
    item_id: str | None
    count: int


@dataclass(frozen=True, slots=True)
class Delivery:
    item_id: str
    token: str
    created_at: float
    latency_ms: float


@dataclass
class Matched:
    deliveries: list[Delivery] = field(default_factory=list)
    expected: int = 0
    duplicates: int = 0
    #: accepted pushes about no mail of this run (another run's, or a deployment's own)
    foreign: int = 0
    #: answers other than 200 (dead tokens, throttling): the daemon may retry them
    refused: int = 0
    #: mail → devices that got no push for it
    missing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return len(self.missing)


def parse_received(records: Iterable[Mapping[str, Any]]) -> list[Received]:
    """The mocks' `GET /mock/received` pushes: APNs custom keys and FCM data both carry item_id and count."""
    out = []
    for r in records:
        data = r.get("data") or {}
        try:
            count = max(1, int(data.get("count", 1)))
        except (TypeError, ValueError):
            count = 1
        out.append(Received(str(r.get("token")), r.get("status"), str(r.get("reason") or ""), float(r["at"]),
                            str(data["item_id"]) if data.get("item_id") else None, count))
    return out


def match(mails: Sequence[Mail], devices: Mapping[str, Sequence[str]], received: Iterable[Received]) -> Matched:
    """Which mail reached which device, and when. `devices` maps a mailbox to the tokens it should push to.

    A push names the newest mail it is about (item_id) and how many new mails it stands for (count): when the
    relay coalesced several mails of one mailbox into one push, that push delivers the named mail and the
    count - 1 before it, as the device shows them. A second push naming a mail a device already has is a
    duplicate."""
    by_item = {m.item_id: m for m in mails}
    sequence: dict[str, list[Mail]] = defaultdict(list)
    for m in sorted(mails, key=lambda m: m.created_at):
        sequence[m.mailbox].append(m)
    position = {m.item_id: i for seq in sequence.values() for i, m in enumerate(seq)}
    result = Matched(expected=sum(len(devices.get(m.mailbox, ())) for m in mails))
    delivered: set[tuple[str, str]] = set()
    wanted = {t for tokens in devices.values() for t in tokens}
    for push in sorted(received, key=lambda r: r.at):
        if push.status != 200:
            result.refused += 1
            continue
        mail = by_item.get(push.item_id or "")
        if mail is None or push.token not in wanted:
            result.foreign += 1
            continue
        if (push.token, mail.item_id) in delivered:
            result.duplicates += 1
            continue
        seq, at = sequence[mail.mailbox], position[mail.item_id]
        for covered in seq[max(0, at - push.count + 1):at + 1]:
            if (push.token, covered.item_id) not in delivered:
                delivered.add((push.token, covered.item_id))
                result.deliveries.append(Delivery(covered.item_id, push.token, covered.created_at,
                                                  (push.at - covered.created_at) * 1000))
    result.missing = [(m.item_id, t) for m in mails for t in devices.get(m.mailbox, ())
                      if (t, m.item_id) not in delivered]
    return result


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted `values` (None when empty)."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summarize(matched: Matched, mails: Sequence[Mail], started: float, options: Mapping[str, Any],
              paths: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The result document: options, latency percentiles, throughput, lost and duplicates, latency by path
    (`paths` names each device token's path, e.g. "ews→ios"), and a per-second timeline (mails created, pushes
    delivered, latency p50/p99 of the mails created in that second)."""
    latencies = sorted(d.latency_ms for d in matched.deliveries)
    by_path: dict[str, list[float]] = defaultdict(list)
    for d in matched.deliveries:
        by_path[(paths or {}).get(d.token, "all")].append(d.latency_ms)
    # a mailbox's first mail of the run finds the daemon's per-mailbox caches cold; the later ones do not
    mailbox_of = {m.item_id: m.mailbox for m in mails}
    first_item: dict[str, str] = {}
    for m in sorted(mails, key=lambda m: m.created_at):
        first_item.setdefault(m.mailbox, m.item_id)
    first = sorted(d.latency_ms for d in matched.deliveries if first_item[mailbox_of[d.item_id]] == d.item_id)
    later = sorted(d.latency_ms for d in matched.deliveries if first_item[mailbox_of[d.item_id]] != d.item_id)
    created = [m.created_at for m in mails]
    arrivals = sorted(d.created_at + d.latency_ms / 1000 for d in matched.deliveries)
    span = (max(created) - min(created)) if len(created) > 1 else 0.0
    push_span = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    timeline: dict[int, dict[str, Any]] = defaultdict(lambda: {"mails": 0, "pushes": 0, "latencies": []})
    for at in created:
        timeline[int(at - started)]["mails"] += 1
    for d in matched.deliveries:
        timeline[int(d.created_at + d.latency_ms / 1000 - started)]["pushes"] += 1
        timeline[int(d.created_at - started)]["latencies"].append(d.latency_ms)
    seconds = []
    for second in sorted(timeline):
        row = timeline[second]
        lat = sorted(row.pop("latencies"))
        seconds.append({"t": second, **row, "p50_ms": _round(percentile(lat, 0.5)),
                        "p99_ms": _round(percentile(lat, 0.99))})
    return {
        "options": dict(options),
        "mails": len(mails),
        "expected_pushes": matched.expected,
        "delivered": len(matched.deliveries),
        "lost": matched.lost,
        "duplicates": matched.duplicates,
        "refused_answers": matched.refused,
        "foreign_pushes": matched.foreign,
        "mail_rate": round(len(mails) / span, 1) if span else None,
        "push_rate": round(len(arrivals) / push_span, 1) if push_span else None,
        "latency_ms": _percentiles(latencies),
        "by_mail": {"first of its mailbox": {"pushes": len(first), **_percentiles(first)},
                    "later": {"pushes": len(later), **_percentiles(later)}},
        "by_path": {name: {"pushes": len(values), **_percentiles(sorted(values))}
                    for name, values in sorted(by_path.items())},
        "missing_sample": [{"item_id": i, "device": f"…{t[-6:]}"} for i, t in matched.missing[:10]],
        "timeline": seconds,
    }


def _percentiles(ordered: Sequence[float]) -> dict[str, float | None]:
    return {name: _round(percentile(ordered, q)) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99),
                                                                  ("max", 1.0))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def deliveries_json(matched: Matched) -> list[dict[str, Any]]:
    return [asdict(d) for d in matched.deliveries]


# --- the files --------------------------------------------------------------------------------------------------


def write_json(result: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def markdown(result: Mapping[str, Any], plot_name: str | None) -> str:
    o, lat = result["options"], result["latency_ms"]
    load = "a burst of {:,} mails".format(o["burst"]) if o.get("burst") else \
        "{:,} mails/s for {:g} s".format(o["rate"], o["duration"])
    lines = [
        "# bemsmail load test",
        "",
        f"{o['mailboxes']:,} mailboxes ({o['ews_mailboxes']:,} on EWS, {o['graph_mailboxes']:,} on Graph), "
        f"{o['devices_per_mailbox']} device(s) each ({o['ios_devices']:,} iOS, {o['android_devices']:,} Android), "
        f"{load}; {len(o['api_urls'])} node(s); run {o['run_id']} at {o['started_at']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| mails created | {result['mails']:,} |",
        f"| pushes expected | {result['expected_pushes']:,} |",
        f"| pushes delivered | {result['delivered']:,} |",
        f"| **lost** (expected - delivered) | **{result['lost']:,}** |",
        f"| **duplicates** | **{result['duplicates']:,}** |",
        f"| mail rate achieved | {_fmt(result['mail_rate'])} /s |",
        f"| push rate | {_fmt(result['push_rate'])} /s |",
        f"| latency p50 / p95 / p99 / max | {_fmt(lat['p50'])} / {_fmt(lat['p95'])} / **{_fmt(lat['p99'])}** / "
        f"{_fmt(lat['max'])} ms |",
        f"| non-200 answers from the mocks | {result['refused_answers']:,} |",
    ]
    if len(result.get("by_path", {})) > 1:
        lines += ["", "| path | pushes | p50 ms | p95 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {row['pushes']:,} | {_fmt(row['p50'])} | {_fmt(row['p95'])} | {_fmt(row['p99'])} | "
                  f"{_fmt(row['max'])} |" for name, row in result["by_path"].items()]
    later = result.get("by_mail", {}).get("later", {})
    if later.get("pushes"):
        lines += ["", "| mail | pushes | p50 ms | p95 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {row['pushes']:,} | {_fmt(row['p50'])} | {_fmt(row['p95'])} | {_fmt(row['p99'])} | "
                  f"{_fmt(row['max'])} |" for name, row in result["by_mail"].items()]
    if result.get("cpu_seconds"):
        lines += ["", "CPU seconds used during the mail phase: " + ", ".join(
            f"{name} {value:.1f}" for name, value in result["cpu_seconds"].items()) + "."]
    lines += [
        "",
        "Latency is end to end: from just before the mail was created in the mock Exchange or mock Graph to the "
        "moment the mock APNs or FCM received the push, matched by the mail's item id in the push's data.",
    ]
    if plot_name:
        lines += ["", f"![latency and throughput over time]({plot_name})"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def write_plot(result: Mapping[str, Any], deliveries: Sequence[Delivery], started: float, path: Path) -> None:
    """Latency of every delivery over time (with per-second p50 and p99) above mails and pushes per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    xs = [d.created_at - started for d in deliveries]
    top.scatter(xs, [d.latency_ms for d in deliveries], s=2, alpha=0.25, color="tab:gray", label="each push")
    seconds = result["timeline"]
    with_latency = [s for s in seconds if s["p50_ms"] is not None]
    top.plot([s["t"] + 0.5 for s in with_latency], [s["p50_ms"] for s in with_latency], color="tab:blue",
             label="p50 per second")
    top.plot([s["t"] + 0.5 for s in with_latency], [s["p99_ms"] for s in with_latency], color="tab:red",
             label="p99 per second")
    top.set_ylabel("mail → push latency (ms)")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(ScalarFormatter())
    top.legend(loc="upper right")
    lat = result["latency_ms"]
    top.set_title(f"{result['mails']:,} mails, {result['delivered']:,} pushes, lost {result['lost']}, "
                  f"duplicates {result['duplicates']}; p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms")
    last = max((s["t"] for s in seconds if s["mails"]), default=0)
    whole = [s for s in seconds if s["t"] <= last]  # the second the last push fell in is not a whole one
    bottom.step([s["t"] for s in whole], [s["mails"] for s in whole], where="post", label="mails created/s")
    bottom.step([s["t"] for s in whole], [s["pushes"] for s in whole], where="post", label="pushes received/s")
    bottom.set_xlabel("seconds since the first mail")
    bottom.set_ylabel("per second")
    bottom.legend(loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
