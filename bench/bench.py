"""`make bench`: llmwsd against in-process transformers, measured side by side in one run.

Prints a table and writes bench/results/bench-<time>.json:

* reference: ``model.generate()`` tokens/s for one prompt in this process, and the
  same prompt through a real llmwsd over WebSocket (ratio, goal >= 0.95);
* aggregate tokens/s and time to first token (median, p90) at 1, 2, 4, 8 and 16
  concurrent clients, each asking for the same number of new tokens
  (``min_new_tokens`` makes every run do the same work);
* the ratios the performance goals name: aggregate at 8 / single (goal >= 5),
  median TTFT at 8 / TTFT at 1 (goal <= 3);
* peak RSS of the daemon.

Every figure is the median of ``--repeats`` runs. The daemon is started once and
measured while the reference model is idle, so the two never share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def reference_generate(new_tokens: int, repeats: int, dtype: str) -> float:
    """Tokens/s of plain ``model.generate()`` for one prompt, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    model.generate(**inputs, max_new_tokens=8, do_sample=False)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, **settings)
        rates.append(
            (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - started)
        )
    del model
    return statistics.median(rates)


async def one_client(url: str, prompt: str, new_tokens: int) -> dict[str, float]:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send("{}")
        json.loads(await ws.recv())  # welcome
        started = time.perf_counter()
        await ws.send(
            json.dumps(
                {
                    "type": "inference",
                    "prompt": {"system": "", "user": prompt},
                    "config": {
                        "max_new_tokens": new_tokens,
                        "min_new_tokens": new_tokens,
                        "do_sample": False,
                    },
                }
            )
        )
        first = None
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "token" and first is None:
                first = time.perf_counter()
            if event["type"] in ("done", "error"):
                break
        if event["type"] == "error":
            raise RuntimeError(f"the daemon answered an error: {event}")
        elapsed = time.perf_counter() - started
        return {
            "tokens": event["total_tokens"],
            "elapsed": elapsed,
            "ttft": (first or time.perf_counter()) - started,
            "finished": time.perf_counter(),
            "started": started,
        }


async def concurrent(url: str, clients: int, new_tokens: int) -> dict[str, float]:
    results = await asyncio.gather(
        *(one_client(url, PROMPTS[i % len(PROMPTS)], new_tokens) for i in range(clients))
    )
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


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def measure_daemon(
    daemon: RunningDaemon, levels: list[int], new_tokens: int, repeats: int
) -> dict[int, dict[str, float]]:
    await concurrent(daemon.url, 2, 8)  # warm-up
    return {
        clients: median_of(
            [await concurrent(daemon.url, clients, new_tokens) for _ in range(repeats)]
        )
        for clients in levels
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    print(f"reference: model.generate() on one prompt, {args.new_tokens} tokens, {args.dtype}")
    reference = reference_generate(args.new_tokens, args.repeats, args.dtype)

    with tempfile.TemporaryDirectory() as folder:
        daemon = RunningDaemon(
            Path(folder),
            model={"dtype": args.dtype},
            server={"max_message_size": 1 << 20},
            generation_defaults={"do_sample": False},
        ).start()
        try:
            by_level = asyncio.run(measure_daemon(daemon, levels, args.new_tokens, args.repeats))
            peak_rss = peak_rss_bytes(daemon.proc.pid)  # type: ignore[union-attr]
        finally:
            daemon.stop()

    single = by_level[levels[0]]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30)},
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "reference_generate_tokens_per_s": reference,
        "levels": by_level,
        "ratio_daemon_vs_generate": single["tokens_per_s"] / reference,
        "daemon_peak_rss_mb": round(peak_rss / 1e6),
    }
    if 8 in by_level and 1 in by_level:
        results["ratio_aggregate_8_vs_1"] = (
            by_level[8]["tokens_per_s"] / by_level[1]["tokens_per_s"]
        )
        results["ratio_ttft_8_vs_1"] = by_level[8]["ttft_median_s"] / by_level[1]["ttft_median_s"]

    print(f"\n{'clients':>8} {'tokens/s':>10} {'TTFT median':>12} {'TTFT p90':>10}")
    for clients, row in by_level.items():
        print(
            f"{clients:>8} {row['tokens_per_s']:>10.1f} {row['ttft_median_s'] * 1000:>10.0f} ms"
            f" {row['ttft_p90_s'] * 1000:>7.0f} ms"
        )
    ratios = [
        ("model.generate() in-process, tokens/s", reference, ""),
        ("daemon over WebSocket / generate()", results["ratio_daemon_vs_generate"], ">= 0.95"),
        ("aggregate at 8 clients / at 1", results.get("ratio_aggregate_8_vs_1"), ">= 5"),
        ("median TTFT at 8 clients / at 1", results.get("ratio_ttft_8_vs_1"), "<= 3"),
        ("daemon peak RSS, MB", results["daemon_peak_rss_mb"], ""),
    ]
    print()
    for label, value, goal in ratios:
        if value is not None:
            print(f"{label:<40} {value:>8.2f}  {'(goal ' + goal + ')' if goal else ''}")

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
