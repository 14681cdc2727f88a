"""serve/http.py without Ray: a stream that fails after it started ends with an error event
and [DONE], never a broken chunk."""

import asyncio
import json

from serve.http import sse_events
from serve.openai import APIError


def events(chunks) -> list:
    async def collect():
        return [e async for e in sse_events(chunks)]

    raw = b"".join(asyncio.run(collect())).decode()
    out = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert raw.endswith("\n\n") and out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


def test_an_error_mid_stream_is_an_error_event_then_done():
    async def failing():
        yield {"choices": [{"text": "a"}]}
        raise RuntimeError("index 300 is out of bounds")

    first, error = events(failing())
    assert first == {"choices": [{"text": "a"}]}
    assert error["error"]["type"] == "server_error" and "out of bounds" in error["error"]["message"]
    assert set(error["error"]) == {"message", "type", "param", "code"}


def test_a_client_error_keeps_its_json_and_a_clean_stream_just_ends():
    async def refused():
        yield {"choices": []}
        raise APIError(400, "prompt is too long", param="prompt")

    assert events(refused())[-1]["error"]["param"] == "prompt"

    async def fine():
        yield {"choices": [{"text": "b"}]}

    assert events(fine()) == [{"choices": [{"text": "b"}]}]
