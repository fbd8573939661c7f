"""Azure Speech's REST route: requests as Azure's reference shows them (its headers, an
SSML body, X-Microsoft-OutputFormat), and curl."""

from __future__ import annotations

import asyncio
import io
import wave
from typing import Any

import aiohttp

from tests.conftest import TIMEOUT, ServerFactory
from tests.fake_edge import FakeEdge
from ttsstream.server import Server

KEY = "azure-style-key"
SSML = (
    "<speak version='1.0' xml:lang='en-US'><voice xml:lang='en-US' xml:gender='Male' "
    "name='en-US-ChristopherNeural'>I'm excited to try text to speech!</voice></speak>"
)


async def post(
    server: Server, headers: dict[str, str], body: str = SSML, path: str = "/cognitiveservices/v1"
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.port}{path}", data=body.encode(), headers=headers
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def azure_headers(output: str, **more: str) -> dict[str, str]:
    """The headers of Azure's REST reference example."""
    return {
        "Ocp-Apim-Subscription-Key": KEY,
        "Content-Type": "application/ssml+xml",
        "X-Microsoft-OutputFormat": output,
        "User-Agent": "curl",
        **more,
    }


async def test_the_reference_request_speaks_in_each_output_format(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    fake.tone = True
    server = await start_server(api_keys=(KEY,))
    status, headers, wav = await post(server, azure_headers("riff-24khz-16bit-mono-pcm"))
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(wav)) as reading:
        assert (reading.getframerate(), reading.getnchannels(), reading.getsampwidth()) == (
            24000,
            1,
            2,
        )
    assert fake.records[0].voice.endswith("ChristopherNeural)")
    for output, content_type in (
        ("audio-24khz-48kbitrate-mono-mp3", "audio/mpeg"),
        ("raw-16khz-16bit-mono-pcm", "audio/pcm"),
        ("raw-8khz-8bit-mono-mulaw", "audio/PCMU"),
        ("riff-8khz-8bit-mono-alaw", "audio/wav"),
        ("ogg-48khz-16bit-mono-opus", "audio/ogg; codecs=opus"),
        ("webm-24khz-16bit-24kbps-mono-opus", "audio/webm; codecs=opus"),
        ("Audio-24Khz-48Kbitrate-Mono-Mp3", "audio/mpeg"),
    ):
        status, headers, body = await post(server, azure_headers(output))
        assert status == 200 and body, output
        assert headers["Content-Type"].split(";")[0] == content_type.split(";")[0], output


async def test_what_azure_refuses_is_refused_in_its_shape(start_server: ServerFactory) -> None:
    server = await start_server(api_keys=(KEY,))
    status, _, body = await post(server, azure_headers("audio-99khz-mono-mp3"))
    assert status == 400 and b'"code":"unsupported_format"' in body and b"error" in body
    status, _, body = await post(
        server, {**azure_headers("riff-24khz-16bit-mono-pcm"), "Ocp-Apim-Subscription-Key": "wrong"}
    )
    assert status == 401 and b'"code":"unauthorized"' in body
    bad = azure_headers("riff-24khz-16bit-mono-pcm")
    status, _, body = await post(server, bad, "<speak><mstts:express-as/></speak>")
    assert status == 400 and b'"code":"ssml_invalid"' in body


async def test_a_token_from_issue_token_opens_the_api(start_server: ServerFactory) -> None:
    server = await start_server(api_keys=(KEY,))
    status, _, token = await post(
        server, {"Ocp-Apim-Subscription-Key": KEY}, "", "/sts/v1.0/issueToken"
    )
    assert status == 200 and token
    headers = azure_headers("audio-24khz-48kbitrate-mono-mp3")
    del headers["Ocp-Apim-Subscription-Key"]
    status, _, audio = await post(server, {**headers, "Authorization": f"Bearer {token.decode()}"})
    assert status == 200 and audio


async def test_the_voice_list_in_azure_shape(start_server: ServerFactory) -> None:
    server = await start_server(api_keys=(KEY,), public_lists=False)
    url = f"http://127.0.0.1:{server.port}/cognitiveservices/voices/list"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url, headers={"Ocp-Apim-Subscription-Key": KEY}) as response:
            voices: list[dict[str, Any]] = await response.json()
    aria = next(voice for voice in voices if voice["ShortName"] == "en-US-AriaNeural")
    assert aria["Name"] == "Microsoft Server Speech Text to Speech Voice (en-US, AriaNeural)"
    assert (aria["Locale"], aria["Gender"], aria["VoiceType"]) == ("en-US", "Female", "Neural")


async def test_curl_as_azure_documents_it(start_server: ServerFactory, fake: FakeEdge) -> None:
    server = await start_server(api_keys=(KEY,))
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--fail-with-body",
        "--location",
        "--request",
        "POST",
        f"http://127.0.0.1:{server.port}/cognitiveservices/v1",
        "--header",
        f"Ocp-Apim-Subscription-Key: {KEY}",
        "--header",
        "Content-Type: application/ssml+xml",
        "--header",
        "X-Microsoft-OutputFormat: audio-16khz-128kbitrate-mono-mp3",
        "--header",
        "User-Agent: curl",
        "--data-raw",
        SSML,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    audio, errors = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, errors
    assert audio == bytes(fake.records[0].audio)
