"""The daemon's answers as text for people: what each llmwsctl command prints without --json.

Each function takes one admin answer (a dict, or a list of them) and returns the
text to print, with no trailing newline; the building blocks (tables, sizes,
durations) are in :mod:`llmwsctl.format`.
"""

from __future__ import annotations

from typing import Any

from llmwsctl import format as fmt

# -- status and resources ----------------------------------------------------------------


def render_status(s: dict[str, Any]) -> str:
    if s.get("model"):
        model = f"{s['model']} on {s.get('device')}"
        if s.get("engine"):
            model += f", {s['engine']} engine"
        model += f" (context {s.get('max_context')} tokens)"
    else:
        model = f"none: {s.get('model_reason') or s.get('model_state')}"
    memory = s.get("memory") or {}
    used, total = fmt.gib(memory.get("ram_used_gb")), fmt.gib(memory.get("ram_total_gb"))
    pairs: list[tuple[str, Any]] = [
        ("llmwsd", f"{s.get('version')}, up {fmt.duration(s.get('uptime_s'))}, pid {s.get('pid')}"),
        ("model", model),
    ]
    # A healthy engine needs no line; a stuck one is the first thing an operator must see.
    if s.get("engine_failure"):
        pairs.append(("engine", f"dead: {s['engine_failure']} {RESTARTED}"))
    elif s.get("engine_stuck"):
        pairs.append(("engine", engine_stuck(s.get("engine_heartbeat_age_s"))))
    sessions = f"{s.get('sessions')} ({s.get('active')} generating, {s.get('queue')} queued)"
    pairs += [
        ("listening", s.get("listen", "-")),
        ("sessions", sessions),
        ("memory", f"{used} used of {total}, llmwsd {fmt.gib(memory.get('rss_gb'))}"),
        ("config", s.get("config") or "built-in defaults"),
    ]
    return fmt.fields(pairs)


RESTARTED = "(under systemd, its watchdog restarts llmwsd)"


def engine_stuck(heartbeat_age_s: float | None) -> str:
    """``stuck: no step for 131 s (…)``: the engine has work and its loop has not turned."""
    since = "" if heartbeat_age_s is None else f": no step for {heartbeat_age_s:.0f} s"
    return f"stuck{since} {RESTARTED}"


def render_resources(r: dict[str, Any]) -> str:
    host = r.get("host") or {}
    pairs: list[tuple[str, Any]] = [
        ("device", r.get("device")),
        ("cpu", f"{host.get('cpu_percent')}% of {host.get('cpu_count')} cores"),
        (
            "memory",
            f"{fmt.gib(host.get('ram_used_gb'))} used of {fmt.gib(host.get('ram_total_gb'))} "
            f"({fmt.gib(host.get('ram_available_gb'))} available)",
        ),
        ("llmwsd", f"{fmt.gib(host.get('rss_gb'))} resident"),
    ]
    gpus = r.get("gpus") or []
    for i, gpu in enumerate(gpus):
        pairs.append((f"gpu {i}", render_gpu(gpu)))
    if not gpus and r.get("gpu_status"):
        pairs.append(("gpu", r["gpu_status"]))
    engine = r.get("engine")
    if engine:
        pairs.append(("model", f"{engine.get('model')} ({engine.get('dtype')})"))
        if engine.get("max_context"):
            context = f"{engine['max_context']} tokens"
            if engine.get("kv_bytes_per_token"):
                context += f", KV cache {fmt.size(engine['kv_bytes_per_token'])} per token"
            pairs.append(("context", context))
        load = f"{engine.get('active', 0)} generating, {engine.get('queued', 0)} queued"
        if engine.get("tokens_per_s") is not None:
            load += f", {engine['tokens_per_s']} tokens/s"
        if engine.get("kv_usage_ratio") is not None:
            load += f", KV cache {engine['kv_usage_ratio'] * 100:.0f}% used"
        pairs.append(("engine", load))
        prefixes = engine.get("prefix_cache")
        if prefixes:
            pairs.append(
                (
                    "prefix cache",
                    f"{prefixes['entries']} prompts, {fmt.size(prefixes['bytes'], binary=True)} of"
                    f" {fmt.size(prefixes['max_bytes'], binary=True)}, {prefixes['hits']} reused"
                    f" ({prefixes['reused_tokens']} tokens not prefilled again)",
                )
            )
    else:
        pairs.append(("model", "none loaded"))
    return fmt.fields(pairs)


def render_gpu(gpu: dict[str, Any]) -> str:
    """``NVIDIA H100, 3.1 GiB of 79.6 GiB, 12% busy, 41 °C, 95 W, SM 9.0``."""
    parts = [
        str(gpu.get("name", "GPU")),
        f"{fmt.gib(gpu.get('memory_used_gb'))} of {fmt.gib(gpu.get('memory_total_gb'))}",
    ]
    for key, template in (
        ("utilization_percent", "{}% busy"),
        ("temperature_c", "{} °C"),
        ("power_w", "{} W"),
        ("compute_capability", "SM {}"),
    ):
        if gpu.get(key) is not None:
            parts.append(template.format(gpu[key]))
    return ", ".join(parts)


# -- models and pulls --------------------------------------------------------------------


def render_models(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no models in the model folders: copy one there or `llmwsctl pull SOURCE`"
    rows = [
        [
            "*" if e.get("loaded") else "",
            e.get("name"),
            fmt.size(e.get("size_bytes")),
            parameter_count(e.get("parameters")),
            fmt.ago(e.get("modified")),
            e.get("architecture"),
            e.get("context_length"),
            e.get("dtype"),
            e.get("source"),
        ]
        for e in entries
    ]
    headers = ["", "NAME", "SIZE", "PARAMS", "MODIFIED", "ARCHITECTURE", "CONTEXT", "DTYPE"]
    headers.append("FOLDER")
    lines = [fmt.table(headers, rows, right=(2, 3, 6))]
    if any(e.get("loaded") for e in entries):
        lines.append("* loaded")
    return "\n".join(lines)


def parameter_count(n: int | None) -> str:
    """``135M``, ``7.6B``."""
    if not n:
        return "-"
    for unit, step in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= step:
            return f"{n / step:.1f}{unit}" if n < 10 * step else f"{n / step:.0f}{unit}"
    return str(n)


def render_switch(r: dict[str, Any]) -> str:
    if not r.get("changed"):
        return f"{r['model']} is already loaded"
    was = f" (was {r['previous']})" if r.get("previous") else ""
    return f"switched to {r['model']}{was}, loaded in {r.get('load_s')} s"


def render_pulled(r: dict[str, Any]) -> str:
    return f"pulled {r['name']} into {r['path']} ({fmt.size(r['size_bytes'])})"


def render_pull_started(r: dict[str, Any]) -> str:
    return f"pulling {r['name']} as {r['id']}: see `llmwsctl pulls`"


def render_pull_cancelled(r: dict[str, Any]) -> str:
    return f"cancelled pull {r['id']}"


def render_pulls(pulls: list[dict[str, Any]]) -> str:
    if not pulls:
        return "no pulls"
    rows = []
    for p in pulls:
        done, total = p.get("done") or 0, p.get("total")
        share = f"{done * 100 // total}%" if total else "-"
        note = (p.get("error") or {}).get("message") or p.get("stage")
        rows.append([p["id"], p["name"], p["state"], share, fmt.size(total), p["source"], note])
    headers = ["ID", "NAME", "STATE", "DONE", "SIZE", "SOURCE", "NOTE"]
    lines = [fmt.table(headers, rows, right=(3, 4))]
    if any(p["state"] not in ("running", "queued") for p in pulls):
        lines.append(
            "pull the same SOURCE again to resume; `llmwsctl pulls --clean` removes the rest"
        )
    return "\n".join(lines)


def render_pulls_cleaned(removed: list[dict[str, Any]]) -> str:
    freed = sum(r.get("freed_bytes") or 0 for r in removed)
    return f"removed {len(removed)} unfinished pull(s), {fmt.size(freed)} freed"


def render_removed(r: dict[str, Any]) -> str:
    return f"removed {r['removed']} ({fmt.size(r.get('size_bytes'))} freed)"


# -- sessions, tokens, configuration -----------------------------------------------------


def render_sessions(sessions: list[dict[str, Any]]) -> str:
    if not sessions:
        return "no sessions"
    rows = [
        [
            s.get("id"),
            fmt.duration(s.get("age_s")),
            fmt.duration(s.get("idle_s")),
            s.get("messages"),
            s.get("buffered_events"),
            "yes" if s.get("connected") else "no",
            "yes" if s.get("generating") else "no",
        ]
        for s in sessions
    ]
    headers = ["ID", "AGE", "IDLE", "MESSAGES", "BUFFERED", "CONNECTED", "GENERATING"]
    return fmt.table(headers, rows, right=(1, 2, 3, 4))


def render_session_dropped(r: dict[str, Any]) -> str:
    return f"dropped session {r['dropped']}"


def render_tokens(result: dict[str, Any]) -> str:
    lines = []
    if not result["required"]:
        lines.append("tokens are off: clients need none ([api] tokens_file is not set)")
    if result["tokens"]:
        rows = [
            [t["name"], t["id"], "admin" if t["admin"] else "access", fmt.ago(t["created"])]
            for t in result["tokens"]
        ]
        lines.append(fmt.table(["NAME", "ID", "KIND", "CREATED"], rows))
    elif result["required"]:
        lines.append("no tokens yet: every client is refused (llmwsctl tokens add NAME)")
    return "\n".join(lines)


def render_token_added(r: dict[str, Any]) -> str:
    kind = "admin token" if r["admin"] else "token"
    return f"{kind} {r['name']} ({r['id']}); it is shown this once, keep it safe:\n{r['token']}"


def render_token_revoked(r: dict[str, Any]) -> str:
    return f"revoked token {r['name']} ({r['id']})"


def render_reload(r: dict[str, Any]) -> str:
    lines = [f"configuration reloaded from {r.get('source') or 'built-in defaults'}"]
    if r.get("needs_restart"):
        sections = ", ".join(f"[{name}]" for name in r["needs_restart"])
        lines.append(f"changed but applied only at start: {sections}; restart llmwsd to apply them")
    return "\n".join(lines)
