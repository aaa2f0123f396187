"""`make bench`: llmwsd against in-process transformers, measured side by side in one run.

Prints a table and writes bench/results/bench-<time>.json:

* reference: ``model.generate()`` tokens/s for one prompt in this process, and the
  same prompt through a real llmwsd over WebSocket (ratio, goal >= 0.95);
* aggregate tokens/s and time to first token (median, p90) at 1, 2, 4, 8 and 16
  concurrent clients, each asking for the same number of new tokens
  (``min_new_tokens`` makes every run do the same work);
* the ratios the performance goals name: aggregate at 8 / single (goal >= 5),
  median TTFT at 8 / TTFT at 1 (goal <= 3);
* peak RSS of the daemon, and the load average while measuring.

Both sides do the same work: the same dtype and attention, greedy, no repetition
penalty (``generate()``'s default for this model), as many torch threads as
there are cores. The daemon and the reference take turns, never run at once:
each repeat runs the reference and then every client count, so that a change in
the machine's load (the cores may be shared) hits both sides of a ratio alike.
The table shows the median of each figure over the repeats; each ratio is the
median of the ratios within one repeat. Before measuring, both sides are warmed
up (the daemon's first requests are not counted). Clients connect first and then
ask together, so time to first token measures the scheduler, not handshakes.
Every request is a new conversation: its prompt starts with a number never
asked before, so the daemon's prefix cache can reuse the chat template's system
prompt, which all new chats share, but nothing of earlier requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import DEFAULT_MODEL, RunningDaemon  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the Moon.",
    "Write a poem about autumn leaves.",
    "Explain what a computer network is.",
    "Describe a busy market in the morning.",
    "Tell me about the history of tea.",
]
REQUEST_NUMBERS = itertools.count(1)
ATTENTION = "sdpa"
# What generate() does by default with this model's generation config.
SETTINGS = {"do_sample": False, "repetition_penalty": 1.0}


def new_conversation(prompt: str) -> str:
    """``prompt`` as nobody asked it before (see the module's docstring)."""
    return f"Question {next(REQUEST_NUMBERS)}. {prompt}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


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


async def connect(url: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url, max_size=None)
    await ws.send("{}")
    json.loads(await ws.recv())  # welcome
    return ws


async def ask(ws: websockets.ClientConnection, prompt: str, new_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    config = {**SETTINGS, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    user = new_conversation(prompt)
    request = {"type": "inference", "prompt": {"system": "", "user": user}, "config": config}
    await ws.send(json.dumps(request))
    first = None
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "token" and first is None:
            first = time.perf_counter()
        if event["type"] in ("done", "error"):
            break
    if event["type"] == "error":
        raise RuntimeError(f"the daemon answered an error: {event}")
    finished = time.perf_counter()
    return {
        "tokens": event["total_tokens"],
        "ttft": (first or finished) - started,
        "started": started,
        "finished": finished,
    }


async def concurrent(url: str, clients: int, new_tokens: int) -> dict[str, float]:
    """``clients`` connections that ask at the same moment; aggregate tokens/s and TTFT."""
    sockets = await asyncio.gather(*(connect(url) for _ in range(clients)))
    try:
        results = await asyncio.gather(
            *(ask(ws, PROMPTS[i % len(PROMPTS)], new_tokens) for i, ws in enumerate(sockets))
        )
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": percentile(ttfts, 0.9),
    }


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    return int(hwm.split()[1]) * 1024


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def measure(
    url: str, reference: Reference, levels: list[int], new_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """One entry per repeat: the reference, then every client count, one after another."""
    asyncio.run(concurrent(url, 1, 8))  # warm-up: the daemon's first requests
    asyncio.run(concurrent(url, max(levels), 8))
    runs = []
    for repeat in range(repeats):
        load = os.getloadavg()[0]
        run: dict[str, Any] = {
            "load_1min": load,
            "generate_tokens_per_s": reference.rate(new_tokens),
        }
        run["levels"] = {c: asyncio.run(concurrent(url, c, new_tokens)) for c in levels}
        runs.append(run)
        print(
            f"repeat {repeat + 1}/{repeats} (load {load:.1f}): generate()"
            f" {run['generate_tokens_per_s']:.1f} tokens/s, "
            + ", ".join(f"{c}: {r['tokens_per_s']:.1f}" for c, r in run["levels"].items()),
            flush=True,
        )
    return runs


def paired_ratio(runs: list[dict[str, Any]], numerator: Any, denominator: Any) -> float:
    return statistics.median(numerator(run) / denominator(run) for run in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    import torch

    threads = torch.get_num_threads()
    print(
        f"{args.new_tokens} new tokens per request, {args.dtype}, {ATTENTION}, greedy,"
        f" {threads} torch threads, {args.repeats} repeats; load {os.getloadavg()}",
        flush=True,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as folder:
        daemon = RunningDaemon(
            Path(folder),
            model={"dtype": args.dtype},
            engine={"attention": ATTENTION},
            server={"max_message_size": 1 << 20},
            generation_defaults=SETTINGS,
        ).start()
        try:
            reference = Reference(args.dtype)
            runs = measure(daemon.url, reference, levels, args.new_tokens, args.repeats)
            peak_rss = peak_rss_bytes(daemon.proc.pid)  # type: ignore[union-attr]
        finally:
            daemon.stop()

    by_level = {
        c: {
            key: statistics.median(run["levels"][c][key] for run in runs)
            for key in runs[0]["levels"][c]
        }
        for c in levels
    }
    first = levels[0]
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
        "reference_generate_tokens_per_s": statistics.median(
            run["generate_tokens_per_s"] for run in runs
        ),
        "levels": by_level,
        "ratio_daemon_vs_generate": paired_ratio(
            runs, lambda r: r["levels"][first]["tokens_per_s"], lambda r: r["generate_tokens_per_s"]
        ),
        "daemon_peak_rss_mb": round(peak_rss / 1e6),
        "runs": runs,
    }
    if 8 in by_level and 1 in by_level:
        results["ratio_aggregate_8_vs_1"] = paired_ratio(
            runs, lambda r: r["levels"][8]["tokens_per_s"], lambda r: r["levels"][1]["tokens_per_s"]
        )
        results["ratio_ttft_8_vs_1"] = paired_ratio(
            runs,
            lambda r: r["levels"][8]["ttft_median_s"],
            lambda r: r["levels"][1]["ttft_median_s"],
        )

    print(f"\n{'clients':>8} {'tokens/s':>10} {'TTFT median':>12} {'TTFT p90':>10}")
    for clients, row in by_level.items():
        print(
            f"{clients:>8} {row['tokens_per_s']:>10.1f} {row['ttft_median_s'] * 1000:>9.0f} ms"
            f" {row['ttft_p90_s'] * 1000:>7.0f} ms"
        )
    ratios = [
        ("model.generate() in-process, tokens/s", results["reference_generate_tokens_per_s"], ""),
        ("daemon over WebSocket / generate()", results["ratio_daemon_vs_generate"], ">= 0.95"),
        ("aggregate at 8 clients / at 1", results.get("ratio_aggregate_8_vs_1"), ">= 5"),
        ("median TTFT at 8 clients / at 1", results.get("ratio_ttft_8_vs_1"), "<= 3"),
        ("daemon peak RSS, MB", results["daemon_peak_rss_mb"], ""),
    ]
    print()
    for label, value, goal in ratios:
        if value is not None:
            print(f"{label:<40} {value:>8.2f}  {'(goal ' + goal + ')' if goal else ''}")
    print(f"load average before {load_before}, after {results['load_average_after']}")

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
