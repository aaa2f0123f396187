"""A small WebSocket client run inside the test root with the package's own Python.

    ws_client.py [--session ID] [--prompt TEXT] [--history]

Prints one JSON object: the server's ``welcome``, the ``answer`` text to the
prompt (greedy) and, with --history, the session's ``history`` messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect

URL = "ws://127.0.0.1:8765/"


async def talk(session: str | None, prompt: str | None, history: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with connect(URL, open_timeout=30) as ws:
        await ws.send(json.dumps({"session_id": session} if session else {}))
        result["welcome"] = json.loads(await ws.recv())
        if prompt is not None:
            request = {"do_sample": False, "max_new_tokens": 24}
            await ws.send(
                json.dumps({"type": "inference", "prompt": {"user": prompt}, "config": request})
            )
            answer = []
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 300)))["type"] != "done":
                if event["type"] == "error":
                    raise SystemExit(f"error: {event}")
                if event["type"] == "token":
                    answer.append(event["data"])
            result["answer"] = "".join(answer)
        if history:
            await ws.send(json.dumps({"type": "history"}))
            while (event := json.loads(await ws.recv()))["type"] != "history":
                pass
            result["history"] = event
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session")
    parser.add_argument("--prompt")
    parser.add_argument("--history", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(talk(args.session, args.prompt, args.history))))


if __name__ == "__main__":
    main()
