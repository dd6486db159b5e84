"""The results as a markdown table of ratios, a list of targets met or missed, and a PNG chart."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

PEERS = ("supergateway", "mcp-proxy")
TRANSPORTS = {"sse": "legacy SSE", "mcp": "Streamable HTTP"}
TITLES = {"supergateway": "supergateway 4.0.0", "mcp-proxy": "mcp-proxy 0.13.0", "stdio": "direct stdio"}
TEN_THOUSAND = 10_000
FAULTS = ("errors", "wrong", "foreign")

Rounds = list[dict[str, Any]]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _median(rounds: Rounds | None, key: str) -> float | None:
    values = [r[key] for r in rounds or [] if _number(r.get(key))]
    return statistics.median(values) if values else None


def _paired(
    a: Rounds | None, b: Rounds | None, key: str, combine: Callable[[float, float], float]
) -> float | None:
    """The median over rounds of combine(a, b), each pair taken from the same round."""
    pairs = [
        combine(x[key], y[key])
        for x, y in zip(a or [], b or [], strict=False)
        if _number(x.get(key)) and _number(y.get(key)) and y[key]
    ]
    return statistics.median(pairs) if pairs else None


def _ratio(a: Rounds | None, b: Rounds | None, key: str) -> float | None:
    return _paired(a, b, key, lambda x, y: x / y)


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"**{value:.2f}x**"


def columns(data: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """The gateways measured, in display order, and the ratios shown: (numerator, denominator)."""
    seen = {label.split()[0] for phase in ("serial", "concurrent", "raw") for label in data.get(phase, {})}
    seen |= set(data.get("idle", {}))
    names = [n for n in ("ours", "candidate", "ours-nometrics", "ours-remote", *PEERS, "stdio") if n in seen]
    ratios = [("ours", n) for n in names if n not in ("ours", "candidate", "ours-nometrics", "ours-remote")]
    if "ours-nometrics" in names:  # --metrics-ab: what metrics on cost (ours has them on)
        ratios.append(("ours", "ours-nometrics"))
    if "ours-remote" in names and "supergateway" in names:
        ratios.append(("ours-remote", "supergateway"))
    if "candidate" in names:
        ratios.append(("candidate", "ours"))
    return names, ratios


def rows(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[tuple[str, str], float | None]]]:
    """(measure, value per gateway, ratio per column) for every line of the table."""
    names, ratios = columns(data)
    serial, concurrent, raw = data.get("serial", {}), data.get("concurrent", {}), data.get("raw", {})
    clients = data["environment"]["args"]["clients"]
    out: list[tuple[str, dict[str, Any], dict[tuple[str, str], float | None]]] = []

    def label(name: str, t: str) -> str:
        return "stdio" if name == "stdio" else f"{name} {t}"

    for t, title in TRANSPORTS.items():
        values = {n: _median(serial.get(label(n, t)), "calls_per_s") for n in names}
        out.append(
            (
                f"serial SDK `tools/call`/s, {title}",
                values,
                {
                    (a, b): _ratio(serial.get(label(a, t)), serial.get(label(b, t)), "calls_per_s")
                    for a, b in ratios
                },
            )
        )
    for t, title in TRANSPORTS.items():
        # What ours would do if the gateway took no CPU at all (its time per call less its CPU per call):
        # the most any gateway of this design can reach against the same client and child.
        bound: dict[str, Rounds] = {
            n: _bounds(serial.get(label(n, t))) for n in ("ours", "candidate") if n in names
        }
        out.append(
            (
                f"upper bound: ours at zero gateway CPU, calls/s, {title}",
                {n: _median(r, "calls_per_s") for n, r in bound.items()},
                {(a, b): _ratio(bound.get(a), serial.get(label(b, t)), "calls_per_s") for a, b in ratios},
            )
        )
    for t, title in TRANSPORTS.items():
        out.append(
            (
                f"SDK client CPU per call (serial), ms, {title}",
                {n: _median(serial.get(label(n, t)), "client_cpu_ms") for n in names},
                {},
            )
        )
    for t, title in TRANSPORTS.items():
        cells: dict[str, Any] = {}
        for n in names:
            rounds = concurrent.get(label(n, t))
            if rounds:
                faults = {k: sum(int(r.get(k, 0)) for r in rounds) for k in FAULTS}
                cells[n] = {"calls_per_s": _median(rounds, "calls_per_s"), **faults}
        out.append(
            (
                f"{clients} concurrent SDK clients, calls/s, {title}",
                cells,
                {
                    (a, b): _ratio(concurrent.get(label(a, t)), concurrent.get(label(b, t)), "calls_per_s")
                    for a, b in ratios
                    if b != "stdio"
                },
            )
        )
    for q in ("p50", "p99"):
        for t, title in TRANSPORTS.items():
            key = f"{q}_ms"
            floor = raw.get("stdio")
            added = {
                n: _paired(raw.get(label(n, t)), floor, key, lambda x, y: x - y)
                for n in names
                if n != "stdio"
            }
            added["stdio"] = _median(floor, key)
            out.append((f"raw {q} latency added over stdio, ms, {title}", added, {}))
    for t, title in TRANSPORTS.items():
        out.append(
            (
                f"gateway CPU per call (raw), ms, {title}",
                {n: _median(raw.get(label(n, t)), "gateway_cpu_ms") for n in names if n != "stdio"},
                {
                    (a, b): _ratio(raw.get(label(a, t)), raw.get(label(b, t)), "gateway_cpu_ms")
                    for a, b in ratios
                    if b != "stdio"
                },
            )
        )
    return out


def _bounds(rounds: Rounds | None) -> Rounds:
    return [
        {"calls_per_s": 1 / (1 / r["calls_per_s"] - r["gateway_cpu_ms"] / 1000)}
        for r in rounds or []
        if _number(r.get("calls_per_s")) and _number(r.get("gateway_cpu_ms"))
        if 1 / r["calls_per_s"] > r["gateway_cpu_ms"] / 1000
    ]


def _cell(value: Any, measure: str) -> str:
    if isinstance(value, dict):  # concurrent clients: calls/s and faults
        bad = ", ".join(f"{value[k]} {k}" for k in FAULTS if value[k])
        return _fmt(value["calls_per_s"]) + (f" ({bad})" if bad else " (0 faults)")
    return _fmt(value, 2 if "ms" in measure else 0)


def markdown(data: dict[str, Any]) -> str:
    env, args = data["environment"], data["environment"]["args"]
    names, ratios = columns(data)
    header = [TITLES.get(n, n) for n in names] + [f"{a} ÷ {b}" for a, b in ratios]
    lines = [
        f"Run {env['date']} on {env['cpus']} CPUs ({env['cpu']}), commit {env['commit']}, "
        f"Python {env['python']}, node {env['node'] or '—'}, MCP SDK {env['mcp_sdk']}, "
        f"ours on {env.get('event_loop', 'asyncio')}; "
        f"{args['rounds']} interleaved rounds, medians; {env['seconds']} s; "
        f"CPUs busy with other work before/after: {env.get('busy_cpus_before')}/"
        f"{env.get('busy_cpus_after')}.",
        "",
        "| measure | " + " | ".join(header) + " |",
        "|---|" + "--:|" * len(header),
    ]
    for measure, values, ratio in rows(data):
        if all(v is None for v in values.values()):
            continue  # a measurement this run left out
        cells = [_cell(values.get(n), measure) for n in names]
        if "latency" in measure and "stdio" in names:
            cells[names.index("stdio")] += " (itself)"
        if measure.startswith("serial") and "Streamable" in measure and values.get("supergateway"):
            cells[names.index("supergateway")] += " ¹"
        lines.append(f"| {measure} | " + " | ".join(cells + [_x(ratio.get(r)) for r in ratios]) + " |")
    lines += _idle_rows(data, names, ratios)
    lines.append("")
    if data.get("serial", {}).get("supergateway mcp"):
        lines.append(
            "¹ supergateway serves Streamable HTTP with one child per session (`--stateful`), "
            "so it is left out of the shared-child concurrency test."
        )
    lines += [
        "Calls/s: higher is better. Latency, CPU and memory: lower is better, so for them a ratio "
        "under 1 means ours is ahead. Faults: calls that failed (errors), replies carrying another "
        "call's answer (wrong), replies for requests the client never sent (foreign).",
        "",
        "| target | measured | met |",
        "|---|---|:-:|",
        *[f"| {name} | {shown} | {mark} |" for name, shown, mark in targets(data)],
        "",
    ]
    failed = {
        f"{phase} {label}": "; ".join(sorted({r["error"] for r in rounds if "error" in r}))[:300]
        for phase in ("serial", "concurrent", "raw")
        for label, rounds in data.get(phase, {}).items()
        if any("error" in r for r in rounds)
    }
    if failed:
        lines += ["Failed measurements:", *[f"- {k}: {v}" for k, v in failed.items()], ""]
    return "\n".join(lines)


def _idle_rows(data: dict[str, Any], names: list[str], ratios: list[tuple[str, str]]) -> list[str]:
    idle: dict[str, dict[str, Any]] = data.get("idle", {})
    if not idle:
        return []
    n = data["environment"]["args"]["streams"]

    def cell(name: str, render: Callable[[dict[str, Any]], str]) -> str:
        return render(idle[name]) if name in idle else "—"

    def rss(r: dict[str, Any]) -> str:
        opened = "" if r["streams_opened"] == n else f" ({r['streams_opened']:,} opened)"
        return f"{r['rss_after_kib'] / 1024:,.0f} MB{opened}"

    def per(r: dict[str, Any]) -> str:
        return "—" if r["kib_per_stream"] is None else f"{r['kib_per_stream']:.1f} KiB"

    def p99(r: dict[str, Any]) -> str:
        return f"{r['p99_ms']:.1f} ms" if "p99_ms" in r else "failed"

    def ratio(a: str, b: str, key: str) -> str:
        x, y = idle.get(a, {}).get(key), idle.get(b, {}).get(key)
        return _x(x / y) if _number(x) and _number(y) and y else "—"

    lines = []
    for measure, render, key in (
        (f"gateway RSS holding {n:,} idle SSE streams", rss, "rss_after_kib"),
        ("RSS per idle stream", per, "kib_per_stream"),
        ("`tools/call` p99 while they are held (raw, SSE)", p99, "p99_ms"),
    ):
        cells = [cell(name, render) for name in names] + [ratio(a, b, key) for a, b in ratios]
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    return lines


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda value: value >= bound


def targets(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []

    def check(name: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        mark = "—" if value is None else "yes" if ok(value) else "**no**"
        found.append((name, "not measured" if value is None else shown, mark))

    table = {measure: (values, ratio) for measure, values, ratio in rows(data)}
    serial_sse = table["serial SDK `tools/call`/s, legacy SSE"][1]
    serial_mcp = table["serial SDK `tools/call`/s, Streamable HTTP"][1]
    for (peer, title, bound), ratios in [
        (("supergateway", "serial SSE ≥ 1.5x supergateway", 1.5), serial_sse),
        (("mcp-proxy", "serial SSE ≥ 2x mcp-proxy", 2.0), serial_sse),
        (("stdio", "serial SSE ≥ 0.8x direct stdio", 0.8), serial_sse),
        (("mcp-proxy", "serial Streamable HTTP ≥ 2x mcp-proxy", 2.0), serial_mcp),
    ]:
        value = ratios.get(("ours", peer))
        check(title, value, _at_least(bound), _x(value))
    clients = data["environment"]["args"]["clients"]
    for title in TRANSPORTS.values():
        values, ratios = table[f"{clients} concurrent SDK clients, calls/s, {title}"]
        ours = values.get("ours")
        total = None if ours is None else float(sum(ours[k] for k in FAULTS))
        faults = "—" if ours is None else ", ".join(f"{ours[k]} {k}" for k in FAULTS)
        check(
            f"{title}, {clients} clients: 0 errors, 0 wrong or foreign replies",
            total,
            lambda v: v == 0,
            faults,
        )
        value = ratios.get(("ours", "mcp-proxy"))
        check(f"{title}, {clients} clients ≥ 2x mcp-proxy", value, lambda v: v >= 2, _x(value))
    for title in TRANSPORTS.values():
        added = table[f"raw p50 latency added over stdio, ms, {title}"][0].get("ours")
        check(f"{title}, added p50 latency < 0.5 ms (raw)", added, lambda v: v < 0.5, _fmt(added, 2, " ms"))
    ours = data.get("idle", {}).get("ours")
    if ours:
        n, per = ours["streams_opened"], ours["kib_per_stream"] or 0.0
        if n >= TEN_THOUSAND:
            total, shown = ours["rss_after_kib"], f"{ours['rss_after_kib'] / 1024:,.0f} MB at {n:,}"
        else:
            total = ours["rss_before_kib"] + per * TEN_THOUSAND
            shown = f"{total / 1024:,.0f} MB projected from {n:,} streams ({per:.1f} KiB each)"
        check("10,000 idle SSE streams < 400 MB RSS", total, lambda v: v < 400 * 1024, shown)
        p99 = ours.get("p99_ms")
        check(
            f"tool-call p99 < 50 ms while {n:,} streams are held", p99, lambda v: v < 50, _fmt(p99, 1, " ms")
        )
    return found


def chart(data: dict[str, Any], path: Path) -> Path | None:
    """A PNG of the main figures, or None when matplotlib is not installed (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    names, _ = columns(data)
    table = {measure: values for measure, values, _ in rows(data)}
    clients = data["environment"]["args"]["clients"]
    colors = {
        "ours": "#2a7ab9",
        "candidate": "#7fb8e0",
        "ours-nometrics": "#9fd0a0",
        "supergateway": "#e07b39",
        "mcp-proxy": "#8a8a8a",
        "stdio": "#3a9d5d",
    }
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    def bars(
        ax: Any,
        groups: list[str],
        series: dict[str, list[float | None]],
        title: str,
        unit: str,
        notes: Callable[[str], list[str]] | None = None,
    ) -> None:
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            drawn = ax.bar(xs, [v or 0 for v in values], width, label=name, color=colors.get(name))
            labels = ["" if v is None else _fmt(v, 0 if v >= 10 else 2) for v in values]
            if notes is not None:
                labels = [f"{label}\n{note}".strip() for label, note in zip(labels, notes(name), strict=True)]
            ax.bar_label(drawn, labels=labels, fontsize=7)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)

    def serial(name: str) -> list[float | None]:
        return [table[f"serial SDK `tools/call`/s, {t}"].get(name) for t in TRANSPORTS.values()]

    def concurrent(name: str) -> list[float | None]:
        cells = [
            table[f"{clients} concurrent SDK clients, calls/s, {t}"].get(name) for t in TRANSPORTS.values()
        ]
        return [c["calls_per_s"] if c else None for c in cells]

    def faults(name: str) -> list[str]:
        cells = [
            table[f"{clients} concurrent SDK clients, calls/s, {t}"].get(name) for t in TRANSPORTS.values()
        ]
        return [", ".join(f"{c[k]} {k}" for k in FAULTS if c[k]) if c else "" for c in cells]

    def added(name: str) -> list[float | None]:
        return [
            table[f"raw {q} latency added over stdio, ms, {t}"].get(name)
            for q in ("p50", "p99")
            for t in TRANSPORTS.values()
        ]

    gateways = [n for n in names if n != "stdio"]
    groups = list(TRANSPORTS.values())
    bars(
        axes[0][0],
        groups,
        {n: serial(n) for n in names},
        "serial SDK tools/call (stdio: the child directly)",
        "calls/s (higher is better)",
    )
    bars(
        axes[0][1],
        groups,
        {n: concurrent(n) for n in gateways},
        f"{clients} concurrent SDK clients, one shared child",
        "calls/s (higher is better)",
        faults,
    )
    bars(
        axes[1][0],
        [f"{q} {t}" for q in ("p50", "p99") for t in ("SSE", "Streamable")],
        {n: added(n) for n in gateways},
        "raw JSON-RPC latency added over direct stdio",
        "ms (lower is better)",
    )
    idle = data.get("idle", {})
    streams = data["environment"]["args"]["streams"]
    bars(
        axes[1][1],
        ["RSS MB", "KiB per stream", "call p99 ms"],
        {
            n: [idle[n]["rss_after_kib"] / 1024, idle[n]["kib_per_stream"], idle[n].get("p99_ms")]
            for n in gateways
            if n in idle
        },
        f"holding {streams:,} idle SSE streams",
        "lower is better",
    )
    fig.suptitle(f"mcp-sse vs supergateway 4.0.0 vs mcp-proxy 0.13.0 ({data['environment']['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
