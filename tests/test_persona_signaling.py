"""Personas through the APIs: /personas, the `persona` member of /offer, WHIP query parameters, 400s."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
from conftest import start_server, stop_server
from test_call_e2e import tone
from test_whip import SDP, WhipClient

from server.caller import CallRefused, place_call
from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.source import ModelSource


@pytest.fixture
async def persona_server():
    engine = create_engine(ModelSource("tiny-persona"), max_calls=2, sampling=GREEDY, cpu_threads=1,
                           max_backlog_frames=25)
    server = await start_server(engine)
    yield server
    await stop_server(server)


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_personas_lists_voices_and_limits_or_says_there_are_none(persona_server, tiny_server):
    status, body = await _get(f"{persona_server.url}/personas")
    assert status == 200 and body["takes_persona"] is True
    assert body["voices"] == ["test-high", "test-low"] and body["default_voice"] == "test-high"
    assert body["max_prompt_chars"] == 1000 and body["max_prompt_tokens"] == 300
    assert "teacher" in body["default_prompt"]
    status, body = await _get(f"{tiny_server.url}/personas")
    assert status == 200 and body["takes_persona"] is False
    assert "takes no text or voice prompt" in body["reason"]


async def test_a_call_with_a_persona_replays_it_then_answers(persona_server):
    persona = {"prompt": "You are a patient tutor.", "voice": "test-low"}
    recording = await place_call(persona_server.url, tone(440, 3.0), tail_s=1.0, persona=persona)
    events = recording.events
    ready = next(e for e in events if e["type"] == "ready")
    assert ready["persona"].startswith("voice=test-low prompt_tokens=")
    done = [e for e in events if e["type"] == "prompt"]
    assert len(done) == 1 and done[0]["state"] == "done" and done[0]["seconds"] > 0
    assert recording.first_voiced_at is not None and np.abs(recording.audio).max() > 0.01
    assert recording.summary()["answer_to_first_audio_ms"] > 0
    assert persona_server.engine.stats.prompt_steps >= int(ready["persona"].rsplit("steps=", 1)[1])


@pytest.mark.parametrize(
    ("persona", "status", "message"),
    [
        ({"voice": "nobody"}, 400, "unknown voice 'nobody'; this server's voices: test-high, test-low"),
        ({"prompt": "x" * 1001}, 400, "the prompt is 1001 characters long; this server takes at most 1000"),
        ({"prompt": 42}, 400, "persona.prompt must be a string"),
        ("a pirate", 400, "persona must be a JSON object"),
    ],
)
async def test_a_bad_persona_gets_a_400_that_says_why_and_takes_no_slot(persona_server, persona, status, message):
    with pytest.raises(CallRefused) as refused:
        await place_call(persona_server.url, tone(440, 0.5), persona=persona)
    assert refused.value.status == status and message in refused.value.message
    assert persona_server.engine.free_slots == 2 and not persona_server.service.sessions


async def test_a_persona_sent_to_a_model_that_takes_none_is_refused(tiny_server):
    with pytest.raises(CallRefused) as refused:
        await place_call(tiny_server.url, tone(440, 0.5), persona={"prompt": "You are a pirate."})
    assert refused.value.status == 400
    assert "moshi-webrtc-tiny (moshi) takes no persona" in refused.value.message
    assert tiny_server.engine.free_slots == 2


async def test_whip_takes_the_persona_in_the_query(persona_server):
    client = WhipClient(persona_server.url)
    sdp = await client.offer_sdp()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{persona_server.url}/whip?voice=nobody", data=sdp,
                             headers=client.headers(SDP)) as response:
            assert response.status == 400
            assert "unknown voice 'nobody'" in (await response.json())["error"]
        query = {"voice": "test-low", "prompt": "You are a pirate."}
        async with http.post(f"{persona_server.url}/whip", params=query, data=sdp,
                             headers=client.headers(SDP)) as response:
            assert response.status == 201
            location = response.headers["Location"]
        session = persona_server.service.sessions[location.rsplit("/", 1)[1]]
        assert session.call.prompt.description.startswith("voice=test-low")
        async with http.delete(f"{persona_server.url}{location}", headers=client.headers()) as response:
            assert response.status == 200
    await client.pc.close()
