"""The status page at `/`, for a person: one server-side HTML document, no script, no build step, nothing
fetched from the network (styles inline), refreshed by the browser every few seconds.

`render` is a pure function of what the runtime reports, so it is tested on values; every value from
outside (model ids, error messages, exit reasons) goes through `html.escape`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.admin.wire import Model
from gateway.health.wire import Health

REFRESH_S = 5

if TYPE_CHECKING:
    from gateway.watchdog.state import WatchdogStatus


@dataclass(frozen=True)
class PageData:
    health: Health
    models: list[Model]
    tokens_per_s: float | None  # generated tokens per second over the last few seconds; None: not known yet
    watchdog: WatchdogStatus | None
    watchdog_configured: bool
    now: float  # unix time


def render(data: PageData) -> str:
    h = data.health
    sections = [
        _summary(h, data.tokens_per_s),
        _models(data.models, data.now),
        _memory(h),
        _engine(h),
        _watchdog(data.watchdog, data.watchdog_configured, data.now),
    ]
    reason = f' <span class="reason">{_e(h.reason)}</span>' if h.reason else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlx-gateway: {_e(h.status)}</title>
<style>{_CSS}</style></head>
<body><header><h1>mlx-gateway <small>{_e(h.version)}</small></h1>
<span class="badge {_e(h.status)}">{_e(h.status)}</span>{reason}
</header>
{''.join(sections)}
<footer>Refreshes every {REFRESH_S}s &middot; up {_duration(h.uptime_s)} &middot;
<a href="/health">/health</a> &middot; <a href="/v1/models">/v1/models</a> &middot;
<a href="/metrics">/metrics</a></footer>
</body></html>
"""


def _summary(h: Health, rate: float | None) -> str:
    tiles = [
        ("ready", "yes" if h.ready else "no"),
        ("requests running", str(h.requests_running)),
        ("requests waiting", str(h.requests_waiting)),
        ("tokens / s", f"{rate:.1f}" if rate is not None else "—"),
        ("models loaded", f"{h.models_loaded} of {h.models_available}"),
    ]
    cells = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in tiles)
    return f'<section class="tiles">{cells}</section>'


def _models(models: list[Model], now: float) -> str:
    if not models:
        return "<section><h2>Models</h2><p>No model folders found.</p></section>"
    order = {"loading": 0, "loaded": 1, "failed": 2, "available": 3}
    rows = []
    for m in sorted(models, key=lambda m: (order.get(m.status, 9), m.id)):
        state: str = m.status
        if m.status == "loading" and m.progress is not None:
            p = m.progress
            done = p.bytes_loaded if p.stage in ("loading", "warming") else p.bytes_read
            share = done / p.bytes_total if p.bytes_total else 0.0
            state = (f'loading: {_e(p.stage)} {share:.0%}'
                     f'<div class="bar"><i style="width:{share * 100:.1f}%"></i></div>')
        elif m.status == "failed" and m.error is not None:
            state = f'failed <span class="detail">{_e(m.error.message)}</span>'
        pinned = ' <span class="pin">pinned</span>' if m.pinned else ""
        if m.status != "loaded":
            expiry = "—"
        elif m.pinned:
            expiry = "never (pinned)"
        elif m.expires_at is None:
            expiry = "in use" if m.requests_running else "never"
        else:
            expiry = "in " + _duration(max(0.0, m.expires_at - now))
        last = _ago(now - m.last_used_at) if m.last_used_at else "—"
        rows.append(
            f'<tr class="{_e(m.status)}"><td class="id">{_e(m.id)}{pinned}</td><td>{state}</td>'
            f'<td class="num">{_size(m.size_bytes)}</td><td class="num">{m.requests_running}</td>'
            f"<td>{last}</td><td>{expiry}</td></tr>"
        )
    return ("<section><h2>Models</h2><table><thead><tr><th>model</th><th>state</th><th>size</th>"
            "<th>running</th><th>last use</th><th>unloads</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


def _memory(h: Health) -> str:
    m = h.memory
    if m is None:
        return ""
    budget = max(1, m.budget_bytes)
    parts = [("weights", m.weights_bytes, "w"), ("KV cache", m.kv_cache_bytes, "k"),
             ("prefix cache", m.prefix_cache_bytes, "p")]
    # A part that holds anything shows, however small next to the budget (min-width).
    bar = "".join(f'<i class="{c}" style="width:{min(100.0, b / budget * 100):.2f}%;min-width:{3 if b else 0}px">'
                  "</i>" for _, b, c in parts)
    legend = " &middot; ".join(f'<span class="key {c}"></span>{_e(n)} {_size(b)}' for n, b, c in parts)
    return (f'<section><h2>Memory</h2><div class="mem">{bar}</div><p>{legend} of a {_size(m.budget_bytes)} '
            f"budget &middot; MLX reports {_size(m.active_bytes)} active</p></section>")


def _engine(h: Health) -> str:
    e = h.engine
    rows = [
        ("state", e.state), ("pid", str(e.pid) if e.pid else "—"), ("device", e.device or "—"),
        ("restarts", str(e.restarts)), ("last exit", e.last_exit or "—"),
        ("since progress", f"{e.seconds_since_progress:.1f}s" if e.seconds_since_progress is not None else "idle"),
    ]
    return "<section><h2>Engine</h2>" + _pairs(rows) + "</section>"


def _watchdog(w: WatchdogStatus | None, configured: bool, now: float) -> str:
    if not configured:
        return ""
    if w is None:
        return "<section><h2>Watchdog</h2><p>No watchdog state found in its folder.</p></section>"
    rows = [
        ("running", "yes" if w.running else "no"),
        ("restarts (last hour)", str(w.restarts_last_hour)),
        ("gave up", f"yes: {w.gave_up_reason or 'no reason given'}" if w.gave_up else "no"),
        ("last check", f"{w.last_check_result or '—'}, {_ago(now - w.last_check_at)}" if w.last_check_at else "—"),
    ]
    return "<section><h2>Watchdog</h2>" + _pairs(rows) + "</section>"


def _pairs(rows: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _size(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB"
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB" if n else "0"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 90:
        return f"{s}s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _ago(seconds: float) -> str:
    return "just now" if seconds < 2 else _duration(seconds) + " ago"


_CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
padding:16px 24px;color:#1d2330;background:#f6f7f9}
header{display:flex;align-items:center;gap:12px;flex-wrap:wrap}h1{font-size:20px;margin:0}
h1 small{font-weight:400;color:#6b7280;font-size:13px}h2{font-size:15px;margin:0 0 8px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:12px 16px;margin:14px 0}
.badge{padding:2px 10px;border-radius:999px;font-weight:600;color:#fff;background:#6b7280}
.badge.ok{background:#16a34a}.badge.degraded,.badge.starting,.badge.draining{background:#d97706}
.badge.stalled,.badge.engine_down{background:#dc2626}.reason{color:#6b7280}
.tiles{display:flex;gap:12px;flex-wrap:wrap;background:none;border:0;padding:0}
.tile{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:10px 16px;min-width:120px}
.tile b{display:block;font-size:22px}.tile span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #eef0f3;
vertical-align:top}th{color:#6b7280;font-weight:500;font-size:12px}td.num{text-align:right}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace}tr.available td{color:#6b7280}
tr.failed td{color:#b91c1c}.detail{display:block;font-size:12px;color:#6b7280}
.pin{font-size:11px;background:#e0e7ff;color:#3730a3;border-radius:4px;padding:0 5px;margin-left:4px}
.bar{height:6px;background:#eef0f3;border-radius:3px;margin-top:4px;width:160px}
.bar i{display:block;height:100%;background:#2563eb;border-radius:3px}
.mem{display:flex;height:14px;background:#eef0f3;border-radius:4px;overflow:hidden}.mem i{display:block}
.w{background:#2563eb}.k{background:#f59e0b}.p{background:#10b981}
.key{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:#6b7280}dd{margin:0}
footer{color:#6b7280;font-size:12px}a{color:#2563eb}
"""
