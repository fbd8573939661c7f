"""The fake Edge service itself: what the benchmarks rely on beyond the tests' fixture."""

from __future__ import annotations

import edge_tts
import edge_tts.communicate
import pytest

from tests.fake_edge import FakeEdge, spoken_words

#: Syntheses spread over the two fakes: the kernel picks one per connection (a hash
#: of its addresses), so all of them landing on one fake has odds of 2 in 2**16.
SYNTHESES = 16


async def test_fakes_share_one_port_with_reuse_port(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        FakeEdge(reuse_port=True) as first,
        FakeEdge(port=first.port, reuse_port=True) as second,
    ):
        assert second.port == first.port
        monkeypatch.setattr(edge_tts.communicate, "WSS_URL", first.wss_url)
        text = "Two fakes, one port."
        for _ in range(SYNTHESES):
            audio = 0
            words = []
            async for chunk in edge_tts.Communicate(
                text, "en-US-AriaNeural", boundary="WordBoundary"
            ).stream():
                if chunk["type"] == "audio":
                    audio += len(chunk["data"])
                else:
                    words.append(chunk["text"])
            assert audio and words == spoken_words(text)
        assert first.handshakes + second.handshakes == SYNTHESES
        assert first.handshakes and second.handshakes
        assert not first.violations and not second.violations
