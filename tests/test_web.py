"""The web page in a real Chromium against a real llmwsd with the default model.

One daemon and one browser tab serve the whole module, in order: the chat, a
reload, a dropped connection, a daemon restart, the resources and models
panels. Screenshots go to test-output/web/ for review.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.browser import ChatPage, chromium_context
from tests.conftest import DEFAULT_MODEL, ROOT, RunningDaemon

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = ROOT / "test-output" / "web"
LONG_PROMPT = "Write a detailed story about a dragon who learns to bake bread."
LONG_TOKENS = 120
# The page sends these with every request once the settings panel says temperature 0.
GREEDY = {"temperature": 0.0, "top_p": 0.95, "top_k": 50, "do_sample": False}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail("the default model is missing: run `make model`")
    # A long drain lets a generation cut by SIGTERM finish into the session before exit.
    folder = tmp_path_factory.mktemp("web-daemon")
    daemon = RunningDaemon(folder, server={"drain_timeout": 60.0}).start()
    yield daemon
    daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def chat(daemon: RunningDaemon) -> Iterator[ChatPage]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with chromium_context(viewport={"width": 1280, "height": 820}) as context:
        page = ChatPage(context.new_page())
        page.page.goto(daemon.http + "/")
        page.wait_connected()
        yield page
        assert page.errors == [], "the page threw exceptions"


def reference_answer(daemon: RunningDaemon, prompt: str, max_new_tokens: int) -> str:
    """The text of one uninterrupted greedy run in a new session, over a plain WebSocket."""
    with connect(daemon.url, open_timeout=30) as ws:
        ws.send("{}")
        assert json.loads(ws.recv(30))["type"] == "welcome"
        config = {**GREEDY, "max_new_tokens": max_new_tokens}
        ws.send(
            json.dumps(
                {"type": "inference", "prompt": {"system": "", "user": prompt}, "config": config}
            )
        )
        pieces = []
        while True:
            event: dict[str, Any] = json.loads(ws.recv(120))
            if event["type"] == "token":
                pieces.append(event["data"])
            elif event["type"] in ("done", "error"):
                assert event["type"] == "done", event
                return "".join(pieces)


def shot(chat: ChatPage, name: str) -> Path:
    path = SCREENSHOTS / name
    chat.page.screenshot(path=str(path))
    return path


def test_page_is_served_with_its_files(daemon: RunningDaemon, chat: ChatPage) -> None:
    assert chat.page.title() == "llmws"
    assert chat.page.text_content("#fact-model") == DEFAULT_MODEL.name
    assert chat.page.text_content("#fact-device") not in ("", "–")
    assert "tokens" in str(chat.page.text_content("#fact-context"))


def test_enter_sends_and_shift_enter_adds_a_line(chat: ChatPage) -> None:
    chat.page.fill("#prompt", "")
    chat.page.type("#prompt", "first line")
    chat.page.keyboard.press("Shift+Enter")
    chat.page.keyboard.type("second line")
    assert chat.page.input_value("#prompt") == "first line\nsecond line"
    assert chat.messages() == []
    chat.page.fill("#prompt", "")


def test_a_fresh_page_shows_and_keeps_the_servers_defaults(chat: ChatPage) -> None:
    """Until the user changes a setting, the page shows welcome's and sends none of its own
    (the test config sets max_new_tokens 64; the default model's card temperature 0.2)."""
    chat.open_tab("settings")
    shown = [chat.page.input_value(f"#{key}") for key in ("temperature", "top_p", "max_new_tokens")]
    assert shown == ["0.2", "0.9", "64"]
    chat.page.evaluate(
        """() => {
            window.sentMessages = [];
            const send = llmws.connection.send.bind(llmws.connection);
            llmws.connection.send = (message) => (window.sentMessages.push(message), send(message));
        }"""
    )
    chat.ask("What is the capital of France?")
    chat.wait_answer_ended()
    (inference,) = chat.page.evaluate(
        "() => window.sentMessages.filter((m) => m.type === 'inference')"
    )
    assert "config" not in inference, inference


def test_answer_streams_in(chat: ChatPage) -> None:
    chat.set_settings(temperature=0, max_new_tokens=32)
    chat.ask("What is the capital of France?")
    answer = chat.wait_answer_ended()
    assert answer["status"] == "done"
    assert answer["pieces"] > 1  # streamed in, token by token
    assert "Paris" in answer["text"]
    assert "Paris" in str(chat.page.text_content(".msg.assistant .body"))
    assert "tokens" in str(chat.page.text_content(".msg.assistant .meta"))


# The Server tab's "Last event", and the seq the connection is at, read together.
LAST_EVENT = """() => {
    const label = [...document.querySelectorAll("#connection-facts dt")]
        .find((node) => node.textContent === "Last event");
    return [llmws.connection.lastSeq, label ? label.nextElementSibling.textContent : null];
}"""


def test_server_tab_shows_the_last_event(chat: ChatPage) -> None:
    chat.set_settings(temperature=0, max_new_tokens=32)
    chat.open_tab("server")
    before, shown = chat.page.evaluate(LAST_EVENT)
    assert shown == str(before)
    chat.ask("Name three colors.")
    chat.wait_answer_length(3)
    during, shown = chat.page.evaluate(LAST_EVENT)  # while the answer streams in
    assert during > before and shown == str(during)
    chat.wait_answer_ended()
    after, shown = chat.page.evaluate(LAST_EVENT)
    assert after > during and shown == str(after)


def test_reload_restores_the_conversation(chat: ChatPage) -> None:
    before = chat.messages()
    chat.page.reload()
    chat.wait_connected()
    chat.wait_for("(n) => llmws.messages().length === n", arg=len(before))
    assert [(m["role"], m["text"]) for m in chat.messages()] == [
        (m["role"], m["text"]) for m in before
    ]
    shot(chat, "chat.png")


def test_answer_stats_survive_a_reload(chat: ChatPage) -> None:
    chat.new_chat()
    chat.set_settings(temperature=0, max_new_tokens=32)
    chat.ask("What is the capital of France?")
    chat.wait_answer_ended()
    chat.set_settings(temperature=0, max_new_tokens=8)
    chat.ask(LONG_PROMPT)
    assert chat.wait_answer_ended()["status"] == "done"
    lines = chat.stats_lines()
    assert len(lines) == 2 and all(" tokens · " in line for line in lines), lines
    assert lines[1].startswith("8 tokens") and lines[1].endswith("hit the token limit"), lines
    # The page's ack has reached the server: the `done` events are not replayed after the
    # reload, only the history's texts come back.
    chat.server_caught_up()
    chat.page.reload()
    chat.wait_connected()
    chat.wait_for("() => llmws.messages().length === 4", 10)
    assert chat.stats_lines() == lines
    chat.set_settings(temperature=0, max_new_tokens=32)  # what the next tests' answers need


def test_an_error_beside_a_kept_answer_survives_a_reload(chat: ChatPage) -> None:
    """A failed answer's part stays in the history; the error shown beside it stays too."""
    text = "Once upon a time, a dragon"
    chat.page.evaluate(
        """(text) => {
            const id = "injected-1";
            for (const message of [
                {type: "start", request_id: id},
                {type: "token", request_id: id, data: text},
                {type: "error", request_id: id, code: "interrupted", message: "restarted"},
            ]) llmws.connection.onMessage(message);
        }""",
        text,
    )
    assert chat.wait_answer_ended(10)["status"] == "failed"
    chat.page.reload()
    chat.wait_connected()
    chat.wait_for("() => llmws.messages().length === 4", 10)
    # The server never had this answer: its history comes as the page would get it.
    chat.show_history(
        [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": text}]
    )
    chat.wait_for("() => llmws.messages().length === 2", 5)
    error = str(chat.page.text_content(".msg.assistant .error"))
    assert error.startswith("The server restarted while answering") and "interrupted" in error


def test_model_output_is_never_html(chat: ChatPage) -> None:
    chat.new_chat()
    chat.ask("Write an HTML image tag with src x and onerror alert(1).")
    answer = chat.wait_answer_ended()
    assert "<img" in answer["text"] and "onerror" in answer["text"]
    # The small model does not echo markup reliably: the exact payload, outside a code block,
    # goes through the page's path for a session's history (how answers come back on reload).
    payload = "<img src=x onerror=alert(1)>"
    chat.show_history(
        [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": payload}]
    )
    chat.wait_for(
        "(p) => document.querySelector('.msg.assistant .body').textContent.includes(p)", 5, payload
    )
    assert chat.page.locator(".messages img").count() == 0
    assert chat.dialogs == []


MARKDOWN = """# Title
Some **bold**, *italic*, `code`, a [link](https://example.org/) and [bad](javascript:alert(1)).

- one
- two
  - nested

1. first
2. second

```js
const x = 1 < 2;
```
"""


def test_markdown_rendering_and_copy_button(daemon: RunningDaemon, chat: ChatPage) -> None:
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=daemon.http)
    chat.show_history(
        [{"role": "user", "content": "md"}, {"role": "assistant", "content": MARKDOWN}]
    )
    chat.wait_for("() => document.querySelector('.msg.assistant .body h3') !== null", 5)
    body = chat.page.locator(".msg.assistant .body")
    assert body.locator("h3").inner_text() == "Title"
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("em").inner_text() == "italic"
    assert body.locator("p code").inner_text() == "code"
    assert body.locator("a").count() == 1
    assert body.locator("a").get_attribute("href") == "https://example.org/"
    assert "[bad](javascript:alert(1))" in body.inner_text()
    assert body.locator("ul > li").count() == 3
    assert body.locator("li > ul > li").inner_text() == "nested"
    assert body.locator("ol > li").count() == 2
    assert body.locator(".codeblock .lang").inner_text() == "js"
    assert body.locator(".codeblock pre code").inner_text() == "const x = 1 < 2;"
    body.locator(".codeblock .copy").click()
    chat.wait_for("() => document.querySelector('.codeblock .copy').textContent === 'Copied'", 5)
    assert chat.page.evaluate("() => navigator.clipboard.readText()") == "const x = 1 < 2;"


def test_stop_ends_the_answer(chat: ChatPage) -> None:
    chat.new_chat()
    chat.set_settings(temperature=0, max_new_tokens=400)
    chat.ask(LONG_PROMPT)
    chat.wait_answer_length(20)
    chat.page.click("#stop")
    answer = chat.wait_answer_ended()
    assert answer["status"] == "done"
    assert "stopped" in str(chat.page.text_content(".msg.assistant:last-child .meta"))
    assert chat.page.is_visible("#send")


def test_new_chat_during_an_answer(chat: ChatPage) -> None:
    chat.ask(LONG_PROMPT)
    chat.wait_answer_length(20)
    chat.new_chat()
    chat.page.wait_for_timeout(1500)  # the cancelled answer's last events must not come back
    assert chat.messages() == []
    chat.page.reload()  # the session's history is empty too
    chat.wait_connected()
    chat.page.wait_for_timeout(500)
    assert chat.messages() == []


def test_errors_are_shown_beside_the_answer(chat: ChatPage) -> None:
    chat.new_chat()
    chat.ask("word " * 9000)  # more tokens than the model's context
    answer = chat.wait_answer_ended()
    assert answer["status"] == "failed"
    error = str(chat.page.text_content(".msg.assistant:last-child .error"))
    assert error.startswith("The conversation is too long for this model"), error
    assert "context_too_long" in error


@pytest.fixture(scope="module")
def long_answer(daemon: RunningDaemon) -> str:
    return reference_answer(daemon, LONG_PROMPT, LONG_TOKENS)


def test_resume_after_a_dropped_connection(chat: ChatPage, long_answer: str) -> None:
    chat.new_chat()
    chat.set_settings(temperature=0, max_new_tokens=LONG_TOKENS)
    chat.ask(LONG_PROMPT)
    chat.wait_answer_length(40)
    chat.page.evaluate("() => llmws.dropConnection()")
    chat.wait_state("reconnecting", 5)
    assert "Reconnecting" in str(chat.page.text_content("#banner"))
    answer = chat.wait_answer_ended()
    assert chat.state == "connected"
    assert (answer["status"], answer["text"]) == ("done", long_answer)


def test_resume_across_a_daemon_restart(
    daemon: RunningDaemon, chat: ChatPage, long_answer: str
) -> None:
    chat.new_chat()
    chat.set_settings(temperature=0, max_new_tokens=LONG_TOKENS)
    chat.ask(LONG_PROMPT)
    chat.wait_answer_length(40)
    # SIGTERM drains: the generation finishes into the session, which the new daemon reloads.
    assert daemon.stop(signal.SIGTERM, timeout=90) == 0
    chat.wait_state("reconnecting", 10)
    shot(chat, "reconnecting.png")
    daemon.start()
    answer = chat.wait_answer_ended()
    assert (answer["status"], answer["text"]) == ("done", long_answer)


def test_resources_panel_charts(chat: ChatPage) -> None:
    chat.open_tab("resources")
    # Two reports at the 2 s interval make a line.
    chat.wait_for("() => document.querySelector('#resource-facts').textContent !== ''", 10)
    chat.page.wait_for_timeout(4500)
    legends = chat.page.locator(".chart-legend").all_text_contents()
    assert any("RAM" in text for text in legends)
    assert any("CPU" in text for text in legends)
    shot(chat, "resources.png")


def test_resources_panel_with_gpus_and_old_servers(chat: ChatPage) -> None:
    """GPU figures as llmwsd reports them on CUDA, and a report with only the old keys."""
    gpu = {"memory_used_gb": 30.5, "memory_total_gb": 79.6, "utilization_percent": 87}
    report = {
        "type": "resources",
        "device": "cuda:0",
        "total_gb": 79.6,
        "free_gb": 49.1,
        "host": {"cpu_percent": 12.5, "ram_total_gb": 125.0, "ram_used_gb": 20.0},
        "gpus": [
            {"index": 0, "name": "NVIDIA H100", "temperature_c": 41, **gpu},
            {"index": 1, "name": "NVIDIA H100", "temperature_c": 38, **gpu},
        ],
    }
    old_report = {"type": "resources", "device": "cpu", "total_gb": 16.0, "free_gb": 12.0}
    # Injected and read back in one evaluate: the server's own report, pushed every 2 s, cannot
    # land in between and redraw the panel with this machine's figures.
    show_and_read = """(m) => {
        llmws.connection.onMessage(m);
        const legends = [...document.querySelectorAll(".chart-legend")].map((e) => e.textContent);
        return [legends.join(" "), document.querySelector("#resource-facts").textContent];
    }"""
    chat.open_tab("resources")
    for message in (report, old_report):
        legends, facts = chat.page.evaluate(show_and_read, message)
        if message is report:
            assert "GPU 0" in legends and "GPU 1" in legends, legends
            assert "NVIDIA H100 · 30.5 GB of 79.6 GB · 41 °C" in facts
            assert "RAM20.0 GB used of 125.0 GB" in facts
        else:
            assert "RAM4.0 GB used of 16.0 GB" in facts


# The speed chart's legend and the panel's figures, read in the same turn as a report lands.
READ_SPEED = """() => [
    [...document.querySelectorAll(".chart")]
        .find((chart) => chart.querySelector(".chart-title").textContent === "Generation speed")
        .querySelector(".chart-legend").textContent,
    document.querySelector("#resource-facts").textContent,
]"""

# Waits for the server's next report with nothing generating; returns its tokens_per_s and
# the panel as it shows that report.
NEXT_IDLE_REPORT = (
    """() => new Promise((resolve, reject) => {
    const read = """
    + READ_SPEED
    + """;
    const connection = llmws.connection;
    const original = connection.onMessage;
    const timer = setTimeout(() => {
        connection.onMessage = original;
        reject(new Error("no resources report with nothing generating in 10 s"));
    }, 10000);
    connection.onMessage = (message, info) => {
        original(message, info);
        const engine = message.engine || {};
        if (message.type === "resources" && engine.active === 0) {
            clearTimeout(timer);
            connection.onMessage = original;
            resolve([engine.tokens_per_s, ...read()]);
        }
    };
})"""
)


def test_resources_speed_is_zero_while_idle(chat: ChatPage) -> None:
    """llmwsd's tokens_per_s averages the last minute: it stays up for a while after an answer.

    The page shows 0 (and "idle") while the engine says nothing is generating, as
    ``llmwsctl resources`` does once the minute is over.
    """
    chat.set_settings(temperature=0, max_new_tokens=24)
    chat.ask("Name three animals.")
    chat.wait_answer_ended()
    chat.open_tab("resources")
    rate, legend, facts = chat.page.evaluate(NEXT_IDLE_REPORT)
    assert isinstance(rate, int | float)  # the server's figure, maybe still above 0
    assert legend == "server 0.0 tok/s", legend
    assert "Speedidle" in facts, facts
    # The same report, injected, with the figure that a long answer leaves for a minute; and
    # one while generating, which shows the server's figure. Shown and read in one evaluate.
    show_and_read = "(m) => { llmws.connection.onMessage(m); return (" + READ_SPEED + ")(); }"
    for active, shown in (
        (0, ("server 0.0 tok/s", "Speedidle")),
        (1, ("server 16.3 tok/s", "Speed16.3 tok/s")),
    ):
        engine = {"active": active, "queued": 0, "tokens_per_s": 16.3}
        legend, facts = chat.page.evaluate(
            show_and_read, {"type": "resources", "device": "cpu", "engine": engine}
        )
        assert legend == shown[0], (active, legend)
        assert shown[1] in facts, (active, facts)


def test_models_panel_lists_and_refuses_management(chat: ChatPage) -> None:
    chat.open_tab("models")
    chat.wait_for("() => document.querySelector('.model.loaded') !== null", 10)
    assert DEFAULT_MODEL.name in str(chat.page.text_content(".model.loaded"))
    assert chat.page.is_hidden("#download")  # no token: no management controls
    chat.open_tab("server")
    chat.page.fill("#server-token", "not-an-admin-token")
    chat.page.click("#connection-form button[type=submit]")
    chat.wait_connected()
    chat.open_tab("models")
    assert chat.page.is_visible("#download")
    chat.page.fill("#download-repo", "HuggingFaceTB/SmolLM2-360M-Instruct")
    chat.page.click("#download button[type=submit]")
    chat.wait_for("() => document.querySelector('#models-message').dataset.kind === 'error'", 10)
    assert "does not allow model management" in str(chat.page.text_content("#models-message"))
    assert chat.page.is_hidden("#download")
    shot(chat, "models.png")


def test_phone_sized_screen(chat: ChatPage) -> None:
    chat.page.set_viewport_size({"width": 390, "height": 844})
    chat.page.reload()
    chat.wait_connected()
    assert chat.page.is_hidden("#panel")
    overflow = chat.page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0
    shot(chat, "phone.png")
    chat.page.set_viewport_size({"width": 1280, "height": 820})


def test_restore_defaults_goes_back_to_the_servers(chat: ChatPage) -> None:
    chat.set_settings(temperature=1.5, max_new_tokens=7)
    assert chat.page.evaluate("() => localStorage.getItem('llmws.settings')") is not None
    chat.page.click("#settings-reset")
    shown = [chat.page.input_value(f"#{key}") for key in ("temperature", "top_p", "max_new_tokens")]
    assert shown == ["0.2", "0.9", "64"]  # welcome's: the model card's and the test config's
    assert chat.page.evaluate("() => localStorage.getItem('llmws.settings')") is None
