"""`make bench`: llmwsd against in-process transformers and against vLLM's own server.

Prints tables and writes bench/results/bench-<time>.json:

* reference: ``model.generate()`` tokens/s for one prompt in this process, and the
  same prompt through a real llmwsd over WebSocket (ratio, goal >= 0.95);
* aggregate tokens/s and time to first token (median, p90) at 1, 8 and 32
  concurrent clients (``--levels``), each asking for the same number of new tokens
  (``min_new_tokens`` makes every run do the same work), for three servers on the
  same weights (``--servers``): llmws on its own transformers engine
  (``transformers``), llmws on vLLM (``vllm``: ``[engine] backend = "vllm"``,
  compiled), and vLLM's own OpenAI server (``vllm-server``: streaming
  ``/v1/chat/completions`` over HTTP);
* llmws on its transformers engine through its OpenAI API as well (streaming
  ``POST /v1/chat/completions`` on the WebSocket port, the client vLLM's server
  gets), at those of the client counts that are 1 or 8: a row "over the OpenAI
  API" under the transformers engine's in the table;
* llmws on either engine (``transformers``, ``vllm``: those of ``--servers``) with
  every answer constrained to JSON as well, at the same client counts: the same
  WebSocket requests with a ``format`` in their config, a JSON schema whose one
  string cannot close within the budget (``minLength`` 100000: servers.JSON_FORMAT),
  so that every answer still has exactly its new tokens; a row "constrained JSON"
  under the server's in the table;
* the ratios the performance goals name: for the transformers engine aggregate at
  8 / single (goal >= 5) and median TTFT at 8 / TTFT at 1 (goal <= 3); for llmws
  on vLLM against vLLM's server, aggregate (goal >= 0.95 at 8 and 32 clients) and
  median TTFT (goal <= 1.1), with the transformers engine's ratios beside; for
  the transformers engine's OpenAI API against its WebSocket API, aggregate
  (goal >= 0.95) and median TTFT (goal <= 1.1) at 1 and 8 clients; for each llmws
  server, constrained JSON against free answers, aggregate (goal >= 0.8) and median
  TTFT (no goal) at 1 and 8 clients;
* peak RSS of each server, and the load average while measuring.

Both sides do the same work: the same dtype and attention, greedy, no repetition
penalty (``generate()``'s default for this model), as many torch threads as
there are cores. vLLM's server gets the same conversations as llmws (a user
message, no system message) and renders them with the same chat template (the
model folder's); each request's prompt token count is checked to be the same on
every server. The servers are started one after the other and stay up, idle,
while another is measured; they take turns, never run at once: each repeat runs
the reference and then every client count on every server, so that a change in
the machine's load (the cores may be shared) hits both sides of a ratio alike.
The OpenAI API of the transformers engine is measured right after its WebSocket
API at the same client count (right before, every other repeat), a server's
constrained JSON right before its free answers (right after, every other repeat).
The table shows the median of each figure over the repeats; each ratio is the
median of the ratios within one repeat. Before measuring, every server is warmed
up (its first requests are not counted). Clients connect first and then ask
together, so time to first token measures the scheduler, not handshakes (an HTTP
client opens its keep-alive connection with a GET: ``/health`` on vLLM's server,
``/v1/models`` on llmws, where a connection whose first request is not under
``/v1/`` is the WebSocket server's, closed after a plain GET). Every request is
a new conversation: its prompt starts with a number never asked of that server
before, so a prefix cache can reuse the chat template's system prompt, which all
new chats share, but nothing of earlier requests; every server is asked the same
sequence of prompts. The OpenAI API of the transformers engine is asked the
prompts its WebSocket API is asked at the same client count in the same repeat,
but for their first word ("Request 17." for "Question 17.", as many tokens): new
to its prefix cache as well, and the bench checks that every prompt had the same
token count on both paths. The constrained JSON answers are asked the same way,
opening with "Task 17.", checked the same way, and each checked to begin
``{"text"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.clients import ATTENTION, PROMPTS, new_conversation  # noqa: E402
from bench.servers import (  # noqa: E402
    JSON_FORMAT,
    VLLM_KV_CACHE_GB,
    VLLM_MAX_MODEL_LEN,
    Llmws,
    Server,
    VllmServer,
    cpu_seconds,
    peak_rss_bytes,
)
from tests.conftest import DEFAULT_MODEL  # noqa: E402

SERVERS = {
    "transformers": "llmws (transformers)",
    "vllm": "llmws (vLLM)",
    "vllm-server": "vLLM's server",
}
# The transformers server through its OpenAI API, at those of --levels that are in
# OPENAI_LEVELS: a key beside the servers' in each run, and its label in the table.
OPENAI = "transformers-openai"
OPENAI_LABEL = "  over the OpenAI API"
OPENAI_LEVELS = (1, 8)
# Either llmws server with every answer in JSON (servers.JSON_FORMAT), at JSON_LEVELS.
JSON_LABEL = "  constrained JSON"
JSON_LEVELS = (1, 8)


@dataclass(frozen=True)
class Variant:
    """Another way of asking one llmws server: measured next to its plain WebSocket
    measurement at the same client count, in the same repeat, with the same prompts but
    for their first word (``measure``, a method of Llmws, asks them: measure_openai,
    measure_json)."""

    key: str  # its figures', beside the servers' in each run
    name: str  # in words
    server: str  # the server's name
    label: str  # its row in the table, under the server's
    levels: tuple[int, ...]  # the client counts it is measured at, of --levels
    measure: Callable[[Llmws, int, int, int], dict[str, Any]]  # clients, new tokens, first
    before: bool  # right before the server's measurement (right after, every other repeat)
    against: str  # its ratios' label: "<it> / <the server's WebSocket API>"
    goals: tuple[str, str]  # of its aggregate tokens/s ratio and its median TTFT ratio
    same: str  # the prompt check's words when every prompt had the server's token count

    def levels_in(self, levels: list[int]) -> list[int]:
        return [c for c in levels if c in self.levels]

    def ask(self, server: Server, clients: int, new_tokens: int, first: int) -> dict[str, Any]:
        assert isinstance(server, Llmws) and server.name == self.server
        return self.measure(server, clients, new_tokens, first)


VARIANTS = [
    Variant(
        OPENAI,
        "OpenAI API",
        "transformers",
        OPENAI_LABEL,
        OPENAI_LEVELS,
        Llmws.measure_openai,
        before=False,
        against="OpenAI API / WebSocket",
        goals=(">= 0.95", "<= 1.1"),
        same="the same as over WebSocket",
    ),
    *(
        Variant(
            f"{name}-json",
            f"constrained JSON on {SERVERS[name]}",
            name,
            JSON_LABEL,
            JSON_LEVELS,
            Llmws.measure_json,
            before=True,
            against=f"{SERVERS[name]}: constrained JSON / free",
            goals=(">= 0.8", ""),
            same="the same as without a format",
        )
        for name in ("transformers", "vllm")
    ),
]


# One measurement in a repeat: where its figures go, by client count, and what takes them.
Turn = tuple[dict[int, Any], Callable[[], dict[str, Any]]]


def variants_of(server: str, levels: list[int]) -> list[Variant]:
    """The variants measured of that server at some of ``levels``."""
    return [v for v in VARIANTS if v.server == server and v.levels_in(levels)]


class Reference:
    """Plain ``model.generate()`` on one prompt, in this process.

    Loaded and warmed up on the main thread, measured on a thread of its own: the
    way llmwsd loads a model on a worker thread and runs it on its engine thread.
    It matters to OpenMP: with one team of threads per core, libgomp spins at its
    barriers and collapses (tenfold slower) when other processes share the cores;
    with more teams than cores it spins briefly and then sleeps, as in the daemon.
    """

    def __init__(self, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
        self._model = AutoModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, dtype=getattr(torch, dtype), attn_implementation=ATTENTION
        ).eval()
        self._inputs: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": new_conversation(PROMPTS[0])}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        self._generate(8)  # warm-up, here
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="reference")
        self.rate(8)  # and there

    def rate(self, new_tokens: int) -> float:
        """Tokens/s of one generate() call with exactly ``new_tokens`` new tokens."""
        return self._thread.submit(self._generate, new_tokens).result()

    def _generate(self, new_tokens: int) -> float:
        with self._torch.inference_mode():
            started = time.perf_counter()
            out = self._model.generate(
                **self._inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            elapsed = time.perf_counter() - started
        return (out.shape[1] - self._inputs["input_ids"].shape[1]) / elapsed


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def measure(
    servers: list[Server],
    reference: Reference | None,
    levels: list[int],
    new_tokens: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """One entry per repeat: the reference, then every client count of every server in turn.

    At a client count of its levels, each of the server's variants is measured right next
    to its WebSocket measurement: before it or after it (the other way every other
    repeat), with the same prompts but for their first word. The transformers server's
    turns at 1 and at 8 clients are then its constrained JSON, its WebSocket API, its
    OpenAI API (in odd-numbered repeats; the other way round in even-numbered ones).
    """
    for server in servers:  # warm-up: each server's first requests
        for clients in (1, max(levels)):
            first = server.asked + 1
            server.measure(clients, 8)
            for variant in variants_of(server.name, levels):
                variant.ask(server, min(clients, max(variant.levels_in(levels))), 8, first)
    runs = []
    for repeat in range(repeats):
        run: dict[str, Any] = {"load_1min": os.getloadavg()[0], "servers": {}}
        if reference is not None:
            run["generate_tokens_per_s"] = reference.rate(new_tokens)
        for server in servers:
            others = [s.pid for s in servers if s is not server]
            idle_cpu = cpu_seconds(others)
            figures: dict[int, Any] = {}
            variants = variants_of(server.name, levels)
            variant_figures: dict[str, dict[int, Any]] = {v.key: {} for v in variants}
            for clients in levels:
                first = server.asked + 1  # the same prompts on every path
                before: list[Turn] = []
                after: list[Turn] = []
                for v in variants:
                    if clients in v.levels:
                        turn = partial(v.ask, server, clients, new_tokens, first)
                        (before if v.before else after).append((variant_figures[v.key], turn))
                free: Turn = (figures, partial(server.measure, clients, new_tokens))
                turns = [*before, free, *after]
                if repeat % 2:
                    turns.reverse()
                for into, ask in turns:
                    load = os.getloadavg()[0]
                    into[clients] = {**ask(), "load_1min": load}
            run["servers"][server.name] = figures
            run["servers"] |= variant_figures
            run.setdefault("idle_servers_cpu_s", {})[server.name] = cpu_seconds(others) - idle_cpu
        if "transformers" in run["servers"]:
            run["levels"] = run["servers"]["transformers"]  # the key before vLLM came
        runs.append(run)
        reference_text = (
            f"generate() {run['generate_tokens_per_s']:.1f} tokens/s; " if reference else ""
        )
        print(
            f"repeat {repeat + 1}/{repeats} (load {run['load_1min']:.1f}): {reference_text}"
            + "; ".join(
                f"{name} " + ", ".join(f"{c}: {r['tokens_per_s']:.1f}" for c, r in figures.items())
                for name, figures in run["servers"].items()
            ),
            flush=True,
        )
    return runs


def paired_ratio(runs: list[dict[str, Any]], numerator: Any, denominator: Any) -> float:
    return statistics.median(numerator(run) / denominator(run) for run in runs)


def figure(server: str, clients: int, key: str) -> Callable[[dict[str, Any]], float]:
    return lambda run: run["servers"][server][clients][key]


def check_variant_prompts(runs: list[dict[str, Any]], variant: Variant, levels: list[int]) -> str:
    """Whether each prompt had the same token count on the variant as on its server."""
    for repeat, run in enumerate(runs):
        for c in variant.levels_in(levels):
            mine, its = (
                run["servers"][n][c]["prompt_tokens"] for n in (variant.key, variant.server)
            )
            if mine != its:
                return f"NOT THE SAME: repeat {repeat + 1}, {c} clients: {mine} against {its}"
    return variant.same


def check_prompts(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Whether every server saw prompts of the same token counts (the same prompts)."""
    first = runs[0]["servers"]
    counts = {name: {c: r["prompt_tokens"] for c, r in first[name].items()} for name in names}
    if all(counts[name] == counts[names[0]] for name in names):
        return "the same on every server"
    return f"NOT THE SAME: {counts}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,8,32", help="client counts (default 1,8,32)")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"which servers, in the order measured (default {','.join(SERVERS)})",
    )
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    names = args.servers.split(",")
    unknown = [n for n in names if n not in SERVERS]
    if unknown or len(set(names)) != len(names):
        parser.error(f"--servers: each of {', '.join(SERVERS)} once at most, not {args.servers}")
    import torch

    threads = torch.get_num_threads()
    print(
        f"{args.new_tokens} new tokens per request, {args.dtype}, {ATTENTION}, greedy,"
        f" {threads} torch threads, {args.repeats} repeats, {len(names)} servers"
        f" ({', '.join(names)}), clients {args.levels}; load {os.getloadavg()}",
        flush=True,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as folder:
        servers: list[Server] = [
            VllmServer(Path(folder), args.dtype)
            if name == "vllm-server"
            else Llmws(name, Path(folder) / name, args.dtype)
            for name in names
        ]
        try:
            for server in servers:  # one after the other: a start is mostly compiling
                print(f"starting {SERVERS[server.name]}...", flush=True)
                server.start()
                print(f"  up in {server.start_s:.0f} s", flush=True)
            reference = Reference(args.dtype) if "transformers" in names else None
            runs = measure(servers, reference, levels, args.new_tokens, args.repeats)
            peak_rss = {s.name: peak_rss_bytes(s.pid) for s in servers}
        finally:
            for server in reversed(servers):
                server.stop()

    variants = [v for name in names for v in variants_of(name, levels)]
    levels_of = {name: levels for name in names} | {v.key: v.levels_in(levels) for v in variants}
    by_server = {
        name: {
            c: {
                key: statistics.median(run["servers"][name][c][key] for run in runs)
                for key in ("tokens_per_s", "ttft_median_s", "ttft_p90_s", "load_1min")
            }
            for c in at
        }
        for name, at in levels_of.items()
    }
    results: dict[str, Any] = {
        "date": started,
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch_threads": threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "attention": ATTENTION,
        "vllm": {"kv_cache_space_gb": VLLM_KV_CACHE_GB, "max_model_len": VLLM_MAX_MODEL_LEN},
        "prompt_tokens": check_prompts(runs, names),
        "servers": {
            name: {
                "label": SERVERS[name],
                "levels": by_server[name],
                "peak_rss_mb": round(peak_rss[name] / 1e6),
                "start_s": round(server.start_s, 1),
            }
            for name, server in zip(names, servers, strict=True)
        },
    }
    ratios: list[tuple[str, float | None, str]] = []
    if reference is not None:
        first = levels[0]
        tf = by_server["transformers"]
        results |= {
            "reference_generate_tokens_per_s": statistics.median(
                run["generate_tokens_per_s"] for run in runs
            ),
            "levels": tf,
            "ratio_daemon_vs_generate": paired_ratio(
                runs,
                figure("transformers", first, "tokens_per_s"),
                lambda r: r["generate_tokens_per_s"],
            ),
            "daemon_peak_rss_mb": results["servers"]["transformers"]["peak_rss_mb"],
        }
        if 8 in tf and 1 in tf:
            results["ratio_aggregate_8_vs_1"] = paired_ratio(
                runs,
                figure("transformers", 8, "tokens_per_s"),
                figure("transformers", 1, "tokens_per_s"),
            )
            results["ratio_ttft_8_vs_1"] = paired_ratio(
                runs,
                figure("transformers", 8, "ttft_median_s"),
                figure("transformers", 1, "ttft_median_s"),
            )
        ratios = [
            (
                "model.generate() in-process, tokens/s",
                results["reference_generate_tokens_per_s"],
                "",
            ),
            ("daemon over WebSocket / generate()", results["ratio_daemon_vs_generate"], ">= 0.95"),
            ("aggregate at 8 clients / at 1", results.get("ratio_aggregate_8_vs_1"), ">= 5"),
            ("median TTFT at 8 clients / at 1", results.get("ratio_ttft_8_vs_1"), "<= 3"),
        ]
    against = {}
    if "vllm-server" in names:
        for name in (n for n in ("vllm", "transformers") if n in names):
            against[name] = {
                key: {
                    c: paired_ratio(runs, figure(name, c, key), figure("vllm-server", c, key))
                    for c in levels
                }
                for key in ("tokens_per_s", "ttft_median_s")
            }
        results["ratios_vs_vllm_server"] = against
    # Each variant against its server's WebSocket API, within each repeat.
    variant_ratios = {
        v.key: {
            key: {
                c: paired_ratio(runs, figure(v.key, c, key), figure(v.server, c, key))
                for c in levels_of[v.key]
            }
            for key in ("tokens_per_s", "ttft_median_s")
        }
        for v in variants
    }
    prompt_checks = {v.key: check_variant_prompts(runs, v, levels) for v in variants}
    for v in variants:
        if v.key == OPENAI:
            results["openai_api"] = {
                "label": f"{SERVERS['transformers']} over its OpenAI API",
                "levels": by_server[OPENAI],
                "prompt_tokens": prompt_checks[OPENAI],
            }
            results["ratios_openai_vs_websocket"] = variant_ratios[OPENAI]
        else:
            results.setdefault("constrained_json", {})[v.server] = {
                "label": f"{SERVERS[v.server]}, every answer in JSON",
                "format": JSON_FORMAT,
                "levels": by_server[v.key],
                "prompt_tokens": prompt_checks[v.key],
            }
            ratios_json = results.setdefault("ratios_constrained_json_vs_free", {})
            ratios_json[v.server] = variant_ratios[v.key]
    results["runs"] = runs

    print(
        f"\n{'clients':>7}  {'server':<22} {'tokens/s':>9} {'TTFT median':>12}"
        f" {'TTFT p90':>9} {'load':>5}"
    )
    for clients in levels:
        for name in names:
            row = by_server[name][clients]
            print(
                f"{clients:>7}  {SERVERS[name]:<22} {row['tokens_per_s']:>9.1f}"
                f" {row['ttft_median_s'] * 1000:>9.0f} ms {row['ttft_p90_s'] * 1000:>6.0f} ms"
                f" {row['load_1min']:>5.1f}"
            )
            for v in variants_of(name, levels):
                if clients not in v.levels:
                    continue
                row = by_server[v.key][clients]
                print(
                    f"{'':>7}  {v.label:<22} {row['tokens_per_s']:>9.1f}"
                    f" {row['ttft_median_s'] * 1000:>9.0f} ms {row['ttft_p90_s'] * 1000:>6.0f} ms"
                    f" {row['load_1min']:>5.1f}"
                )
    if against:
        heads = [SERVERS[n] for n in against]
        print(
            f"\n{'ratio to ' + SERVERS['vllm-server'] + ' (median per repeat)':<44}"
            + "".join(f" {h:>21}" for h in heads)
            + f"  goal for {SERVERS['vllm']}"
        )
        for key, what, goal in (
            ("tokens_per_s", "aggregate tokens/s", ">= 0.95"),
            ("ttft_median_s", "median TTFT", "<= 1.1"),
        ):
            for c in levels:
                shown = "vllm" in against and (key == "ttft_median_s" or c >= 8)
                label = f"{what} at {c} {'client' if c == 1 else 'clients'}"
                print(
                    f"{label:<44}"
                    + "".join(f" {against[n][key][c]:>21.2f}" for n in against)
                    + (f"  {goal}" if shown else "")
                )
    print()
    for label, value, goal in ratios:
        if value is not None:
            print(f"{label:<40} {value:>8.2f}  {'(goal ' + goal + ')' if goal else ''}")
    lines = []
    for v in variants:
        for key, what, goal in zip(
            ("tokens_per_s", "ttft_median_s"),
            ("aggregate tokens/s", "median TTFT"),
            v.goals,
            strict=True,
        ):
            for c in levels_of[v.key]:
                label = f"{v.against} {what} at {c} {'client' if c == 1 else 'clients'}"
                lines.append((label, variant_ratios[v.key][key][c], goal))
    width = max([56, *(len(label) for label, _, _ in lines)])
    for label, value, goal in lines:
        print(f"{label:<{width}} {value:>8.2f}  {'(goal ' + goal + ')' if goal else ''}".rstrip())
    for name in names:
        server_results = results["servers"][name]
        print(
            f"{SERVERS[name] + ': peak RSS, MB':<40} {server_results['peak_rss_mb']:>8}"
            f"  (up in {server_results['start_s']:.0f} s)"
        )
    print(f"prompt token counts: {results['prompt_tokens']}")
    for v in variants:
        print(f"prompt token counts, {v.name}: {prompt_checks[v.key]}")
    idle = max((max(r.get("idle_servers_cpu_s", {0: 0}).values()) for r in runs), default=0)
    print(f"CPU the idle servers used while another was measured: {idle:.1f} s at most")
    print(f"load average before {load_before}, after {results['load_average_after']}")

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
