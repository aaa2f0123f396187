"""A small WebSocket client run inside the test root with the package's own Python.

    ws_client.py [--session ID] [--prompt TEXT] [--max-new-tokens N]
                 [--started-file PATH] [--history]

Prints one JSON object: the server's ``welcome``, the ``answer`` text to the
prompt (greedy) and, with --history, the session's ``history`` messages.
--started-file is created once the generation has started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect

URL = "ws://127.0.0.1:8765/"


async def talk(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with connect(URL, open_timeout=30) as ws:
        await ws.send(json.dumps({"session_id": args.session} if args.session else {}))
        result["welcome"] = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if args.prompt is not None:
            request = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
            prompt = {"user": args.prompt}
            await ws.send(json.dumps({"type": "inference", "prompt": prompt, "config": request}))
            answer = []
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 300)))["type"] != "done":
                if event["type"] == "error":
                    raise SystemExit(f"error: {event}")
                if event["type"] == "start" and args.started_file:
                    open(args.started_file, "w").close()
                if event["type"] == "token":
                    answer.append(event["data"])
            result["answer"] = "".join(answer)
        if args.history:
            await ws.send(json.dumps({"type": "history"}))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "history":
                pass
            result["history"] = event
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session")
    parser.add_argument("--prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--started-file")
    parser.add_argument("--history", action="store_true")
    print(json.dumps(asyncio.run(talk(parser.parse_args()))))


if __name__ == "__main__":
    main()
