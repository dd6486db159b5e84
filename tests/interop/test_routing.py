"""One shared child, many client sessions: every message reaches only the session it belongs to."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError, types

from tests.conftest import SDK_SERVER, StartGateway, mcp_client, text_of, wait_for_text


async def test_ten_concurrent_clients_get_only_their_own_replies(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    foreign: list[Any] = []

    async def one_client(n: int) -> set[str]:
        async def on_message(message: Any) -> None:
            if not isinstance(message, types.ServerNotification):
                foreign.append(message)  # requests or exceptions would be someone else's traffic

        transport = "sse" if n % 2 else "streamable"
        seen = set()
        async with mcp_client(gw.url, gw.token, transport=transport, message_handler=on_message) as client:
            for i in range(20):
                payload = f"client-{n}-call-{i}"
                seen.add(text_of(await client.call_tool("echo", {"text": payload})))
        return seen

    results = await asyncio.gather(*(one_client(n) for n in range(10)))
    for n, seen in enumerate(results):
        assert seen == {f"client-{n}-call-{i}" for i in range(20)}
    assert foreign == []


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_progress_reaches_only_the_caller(start_gateway: StartGateway, transport: str) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    received: dict[str, list[float]] = {"a": [], "b": []}

    async def run(name: str, steps: int) -> str:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            received[name].append(progress)

        async with mcp_client(gw.url, gw.token, transport=transport) as client:
            result = await client.call_tool("slow", {"steps": steps}, progress_callback=on_progress)
            return text_of(result)

    answers = await asyncio.gather(run("a", 3), run("b", 5))
    assert answers == ["done 3", "done 5"]
    assert received["a"] == [1, 2, 3]
    assert received["b"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_sampling_request_goes_to_the_session_that_caused_it(
    start_gateway: StartGateway, transport: str
) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    asked: dict[str, list[str]] = {"a": [], "b": []}

    def sampler(name: str) -> Any:
        async def callback(
            context: Any, params: types.CreateMessageRequestParams
        ) -> types.CreateMessageResult:
            asked[name].append(params.messages[0].content.text)
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=f"answer from {name}"),
                model="m",
            )

        return callback

    async with (
        mcp_client(gw.url, gw.token, transport=transport, sampling_callback=sampler("a")) as a,
        mcp_client(gw.url, gw.token, transport=transport, sampling_callback=sampler("b")) as b,
    ):
        assert text_of(await a.call_tool("ask_llm", {"question": "from a?"})) == "answer from a"
        assert text_of(await b.call_tool("ask_llm", {"question": "from b?"})) == "answer from b"
    assert asked == {"a": ["from a?"], "b": ["from b?"]}


async def test_ambiguous_server_request_is_refused_not_guessed(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """With two sessions in flight on one shared child, stdio cannot say whose sampling request it is."""
    gw = await start_gateway({"test": SDK_SERVER})
    marker = tmp_path / "marker"
    asked: list[str] = []

    async def sampler(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append("called")
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="leak"), model="m"
        )

    async with (
        mcp_client(gw.url, gw.token, sampling_callback=sampler) as a,
        mcp_client(gw.url, gw.token, sampling_callback=sampler) as b,
    ):
        # b's call is in flight at the child (it wrote "started"), and stays so until b gives up.
        holder = asyncio.create_task(b.call_tool("record_cancel", {"seconds": 3600, "path": str(marker)}))
        await wait_for_text(marker, "started")
        with pytest.raises(MCPError, match="no single client session"):
            await a.call_tool("ask_llm", {"question": "whose?"})
        assert not holder.done()  # the refusal came while b's call was still in flight
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await wait_for_text(marker, "cancelled")  # b's client told the child
    assert asked == []


async def test_log_messages_follow_the_session_and_its_level(start_gateway: StartGateway) -> None:
    gw = await start_gateway({"test": SDK_SERVER})
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async with mcp_client(gw.url, gw.token, logging_callback=on_log) as client:
        assert text_of(await client.call_tool("log_and_answer", {"text": "one"})) == "one"
        await client.set_logging_level("error")
        assert text_of(await client.call_tool("log_and_answer", {"text": "two"})) == "two"
    assert logs == ["log: one"]
