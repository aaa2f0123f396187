"""A real Chromium for the web page's tests, and a small driver for the page.

Debian's ``chromium`` is used (never Playwright's own download: the test
machines may only reach the Debian mirror). When it is missing, it is installed
with apt-get where the tests run as root; elsewhere the tests are skipped with
the reason (and fail in CI, which must run them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import skip_or_fail

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APT_TIMEOUT_S = 600


def ensure_chromium() -> Path:
    """Debian's chromium, installed when missing and possible; otherwise skip the test."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        skip_or_fail(f"{CHROMIUM} is missing and cannot be installed here (apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for command in (install, ["apt-get", "update", "-q"], install):
        result = subprocess.run(command, env=env, capture_output=True, timeout=APT_TIMEOUT_S)
        if command is install and result.returncode == 0:
            break
    if not CHROMIUM.exists():
        output = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
        skip_or_fail(f"installing Debian's chromium failed:\n{output}")
    return CHROMIUM


@contextlib.contextmanager
def chromium_context(**context_options: Any) -> Iterator[Any]:
    """A headless Chromium with a fresh profile; yields a Playwright BrowserContext."""
    executable = ensure_chromium()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="llmws-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(executable),
            headless=True,
            args=LAUNCH_ARGS,
            **context_options,
        )
        try:
            yield context
        finally:
            context.close()


class ChatPage:
    """The llmws page in a browser tab, driven the way a user would (plus the page's test hooks)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def wait_for(self, js_function: str, timeout_s: float = 60, arg: Any = None) -> Any:
        # A function, not an expression: the page's CSP forbids eval of strings.
        return self.page.wait_for_function(js_function, arg=arg, timeout=timeout_s * 1000)

    @property
    def state(self) -> str:
        return str(self.page.get_attribute("#status", "data-state"))

    def wait_state(self, state: str, timeout_s: float = 60) -> None:
        self.wait_for(
            "(s) => document.querySelector('#status').dataset.state === s", timeout_s, state
        )

    def wait_connected(self, timeout_s: float = 60) -> None:
        self.wait_state("connected", timeout_s)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as shown: role, raw text, status and token count of each message."""
        return list(self.page.evaluate("() => llmws.messages()"))

    def set_settings(self, temperature: float, max_new_tokens: int, system: str = "") -> None:
        self.open_tab("settings")
        self.page.fill("#system-prompt", system)
        self.page.fill("#temperature", str(temperature))
        self.page.fill("#max_new_tokens", str(max_new_tokens))

    def open_tab(self, name: str) -> None:
        if self.page.is_hidden("#panel"):
            self.page.click("#panel-toggle")
        self.page.click(f"[data-tab={name}]")

    def ask(self, text: str) -> None:
        """Type ``text`` and press Enter; wait until the page shows the answer started."""
        count = len(self.messages())
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")
        self.wait_for("(n) => llmws.messages().length >= n + 2", arg=count)

    def wait_answer_length(self, length: int, timeout_s: float = 60) -> None:
        self.wait_for(
            "(n) => (llmws.messages().at(-1)?.text.length ?? 0) >= n",
            timeout_s,
            arg=length,
        )

    def wait_answer_ended(self, timeout_s: float = 120) -> dict[str, Any]:
        self.wait_for(
            "() => ['done', 'failed'].includes(llmws.messages().at(-1)?.status)",
            timeout_s,
        )
        return self.messages()[-1]

    def stats_lines(self) -> list[str]:
        """Each answer's stats line ("40 tokens · 23.6 tok/s · …"), in order."""
        return list(
            self.page.evaluate(
                "() => [...document.querySelectorAll('.msg.assistant .meta')]"
                ".map((node) => node.textContent)"
            )
        )

    def server_caught_up(self, timeout_s: float = 10) -> None:
        """Wait until the server has handled what the page sent so far (an ``ack``, say).

        The server handles a connection's frames in order: the answer to a ``history``
        sent now comes after them.
        """
        self.page.evaluate(
            """(ms) => new Promise((resolve, reject) => {
                const connection = llmws.connection;
                const original = connection.onMessage;
                const end = (error) => {
                    clearTimeout(timer);
                    connection.onMessage = original;
                    error ? reject(new Error(error)) : resolve();
                };
                const timer = setTimeout(() => end(`no answer to history in ${ms} ms`), ms);
                connection.onMessage = (message, info) => {
                    original(message, info);
                    if (message.type === "history") end();
                };
                if (!connection.send({type: "history"})) end("not connected");
            })""",
            timeout_s * 1000,
        )

    def show_history(self, messages: list[dict[str, str]]) -> None:
        """Hand the page a ``history`` message, as the server sends one after a reload."""
        self.page.evaluate(
            """(messages) => {
                llmws.chat.clear();
                llmws.chat.restoring = true;
                llmws.connection.onMessage({type: "history", messages});
            }""",
            messages,
        )

    def new_chat(self) -> None:
        self.page.click("#new-chat")
        self.wait_for("() => llmws.messages().length === 0", 30)
