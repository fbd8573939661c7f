// Unit tests of the client's pure logic and message handling: node --test clients/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  TTSStreamClient,
  formatToAsk,
  parseServerMessage,
  sliceCodePoints,
  wordAt,
} from "../ttsstream.js";

const words = [
  { offset_ms: 100, duration_ms: 300 },
  { offset_ms: 450, duration_ms: 200 },
  { offset_ms: 700, duration_ms: 250 },
];

test("wordAt finds the word under the playback clock", () => {
  assert.equal(wordAt(words, 0), -1);
  assert.equal(wordAt(words, 99.9), -1);
  assert.equal(wordAt(words, 100), 0);
  assert.equal(wordAt(words, 420), 0); // the pause before the next word stays on the word
  assert.equal(wordAt(words, 450), 1);
  assert.equal(wordAt(words, 949), 2);
  assert.equal(wordAt(words, 950), -1); // after the last word ends
  assert.equal(wordAt([], 500), -1);
});

test("wordAt is a binary search that agrees with a linear scan", () => {
  const many = Array.from({ length: 1000 }, (_, i) => ({ offset_ms: i * 10, duration_ms: 8 }));
  for (let t = -5; t < 10010; t += 7) {
    let expected = -1;
    for (let i = 0; i < many.length; i++) if (many[i].offset_ms <= t) expected = i;
    if (expected === many.length - 1 && t >= 9990 + 8) expected = -1;
    assert.equal(wordAt(many, t), expected, `at ${t}`);
  }
});

test("parseServerMessage ignores what it does not know", () => {
  assert.deepEqual(parseServerMessage('{"type":"end","id":"a","extra":1}'), {
    type: "end",
    id: "a",
    extra: 1,
  });
  assert.equal(parseServerMessage('{"type":"future_message"}'), null);
  assert.equal(parseServerMessage("not json"), null);
  assert.equal(parseServerMessage("[1,2]"), null);
  assert.equal(parseServerMessage("null"), null);
});

test("sliceCodePoints counts code points like the server", () => {
  const text = "😀 hi café";
  assert.equal(sliceCodePoints(text, 2, 4), "hi");
  assert.equal(sliceCodePoints(text, 5, 9), "café");
});

/** A WebSocket double: records what is sent, lets the test deliver frames. */
class FakeSocket extends EventTarget {
  static OPEN = 1;
  static instances = [];
  constructor(url, protocols) {
    super();
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.readyState = 0;
    FakeSocket.instances.push(this);
  }
  open() {
    this.readyState = 1;
    this.dispatchEvent(new Event("open"));
  }
  deliver(data) {
    const event = new Event("message");
    event.data = typeof data === "string" ? data : data;
    this.dispatchEvent(event);
  }
  send(frame) {
    this.sent.push(JSON.parse(frame));
  }
  close(code = 1000, reason = "") {
    this.readyState = 3;
    const event = new Event("close");
    event.code = code;
    event.reason = reason;
    this.dispatchEvent(event);
  }
}

function connected(options = {}) {
  FakeSocket.instances = [];
  const client = new TTSStreamClient("ws://test/v1/stream", {
    WebSocket: FakeSocket,
    reconnect: false,
    ...options,
  });
  const socket = FakeSocket.instances[0];
  return { client, socket };
}

test("webm is asked for only where Media Source Extensions play it, else mp3", () => {
  assert.equal(globalThis.MediaSource, undefined);
  assert.equal(formatToAsk(undefined), "mp3");
  assert.equal(formatToAsk("webm"), "mp3");
  assert.equal(formatToAsk("flac"), "flac");
  let { client, socket } = connected({ format: "webm" });
  socket.open();
  client.speak("Hi", { id: "a" });
  assert.equal(socket.sent[0].format, undefined, "mp3 is the default: not sent");
  globalThis.MediaSource = class {
    static isTypeSupported(type) {
      return type === 'audio/webm; codecs="opus"';
    }
  };
  try {
    assert.equal(formatToAsk("webm"), "webm");
    ({ client, socket } = connected({ format: "webm" }));
    socket.open();
    client.speak("Hi", { id: "b" });
    client.speak("Hi", { id: "c", format: "mp3" });
    assert.deepEqual(
      socket.sent.map((m) => m.format),
      ["webm", undefined],
    );
  } finally {
    delete globalThis.MediaSource;
  }
});

test("the key travels as a subprotocol, never in the URL unless asked", () => {
  let { socket } = connected({ apiKey: "k1" });
  assert.deepEqual(socket.protocols, ["ttsstream.v1", "key.k1"]);
  assert.equal(socket.url, "ws://test/v1/stream");
  ({ socket } = connected({ apiKey: "k 2", apiKeyInUrl: true }));
  assert.equal(socket.url, "ws://test/v1/stream?api_key=k%202");
  assert.deepEqual(socket.protocols, ["ttsstream.v1"]);
});

test("speak is sent once open, and an utterance follows its messages", async () => {
  const { client, socket } = connected();
  const u = client.speak("Hello world", { id: "u1", voice: "en-US-AriaNeural", rate: "+10%" });
  assert.deepEqual(socket.sent, []);
  socket.open();
  assert.deepEqual(socket.sent, [
    {
      type: "speak",
      id: "u1",
      text: "Hello world",
      words: "batch",
      voice: "en-US-AriaNeural",
      rate: "+10%",
    },
  ]);
  const seen = [];
  for (const type of ["start", "word", "end"]) u.addEventListener(type, () => seen.push(type));
  socket.deliver('{"type":"start","id":"u1","voice":"v","format":"audio/mpeg","sample_rate":24000,"cached":false,"engine":"edge","fallback":false,"fallback_reason":null}');
  socket.deliver('{"type":"word","id":"u1","text":"Hello","offset_ms":100,"duration_ms":300,"char_start":0,"char_end":5}');
  socket.deliver(new Uint8Array([0xff, 0xf3]).buffer);
  socket.deliver('{"type":"end","id":"u1","bytes":2,"audio_ms":0.3,"words":1,"cached":false,"ttfb_ms":3}');
  const end = await u.done;
  assert.equal(end.bytes, 2);
  assert.deepEqual(seen, ["start", "word", "end"]);
  assert.equal(u.words.length, 1);
  assert.equal(u.state, "ended");
});

test("a words message becomes one word event per word, in order", async () => {
  const { client, socket } = connected();
  socket.open();
  const u = client.speak("Hello big world", { id: "u1" });
  const seen = [];
  u.addEventListener("word", (event) => seen.push(event.detail));
  socket.deliver('{"type":"start","id":"u1","voice":"v","format":"audio/mpeg","sample_rate":24000,"cached":true,"engine":"edge","fallback":false,"fallback_reason":null}');
  socket.deliver('{"type":"words","id":"u1","words":[{"text":"Hello","offset_ms":100,"duration_ms":300,"char_start":0,"char_end":5},{"text":"big","offset_ms":450,"duration_ms":200,"char_start":6,"char_end":9}]}');
  socket.deliver('{"type":"word","id":"u1","text":"world","offset_ms":700,"duration_ms":300,"char_start":10,"char_end":15}');
  socket.deliver('{"type":"end","id":"u1","bytes":0,"audio_ms":0,"words":3,"cached":true,"ttfb_ms":1}');
  await u.done;
  assert.deepEqual(
    seen.map((word) => [word.type, word.id, word.text, word.char_start]),
    [
      ["word", "u1", "Hello", 0],
      ["word", "u1", "big", 6],
      ["word", "u1", "world", 10],
    ],
  );
  assert.deepEqual(u.words, seen);
});

test("errors reject the utterance with the stable code", async () => {
  const { client, socket } = connected();
  socket.open();
  const u = client.speak("x", { id: "u2" });
  socket.deliver('{"type":"error","id":"u2","code":"rate_limited","message":"slow down","retry_after":7}');
  await assert.rejects(u.done, (error) => error.code === "rate_limited" && error.retryAfter === 7);
});

test("an error for a refused message never fails the utterance in progress", async () => {
  const { client, socket } = connected();
  socket.open();
  const playing = client.speak("x", { id: "dup" });
  socket.deliver('{"type":"start","id":"dup","voice":"v","format":"audio/mpeg","sample_rate":24000,"cached":false,"engine":"edge","fallback":false,"fallback_reason":null}');
  socket.deliver('{"type":"error","id":"dup","code":"invalid_parameter","message":"in use","for":"speak"}');
  socket.deliver('{"type":"error","id":"dup","code":"not_found","message":"no","for":"cancel"}');
  assert.equal(playing.state, "playing");
  socket.deliver('{"type":"end","id":"dup","bytes":0,"audio_ms":0,"words":0,"cached":false,"ttfb_ms":1}');
  assert.equal((await playing.done).type, "end");
  const refused = client.speak("y", { id: "new" });
  socket.deliver('{"type":"error","id":"new","code":"invalid_voice","message":"unknown voice","for":"speak"}');
  await assert.rejects(refused.done, (error) => error.code === "invalid_voice");
});

test("cancel asks the server and audio after it is ignored", async () => {
  const { client, socket } = connected();
  socket.open();
  const u = client.speak("x", { id: "u3" });
  socket.deliver('{"type":"start","id":"u3","voice":"v","format":"audio/mpeg","sample_rate":24000,"cached":false,"engine":"edge","fallback":false,"fallback_reason":null}');
  u.cancel();
  assert.deepEqual(socket.sent.at(-1), { type: "cancel", id: "u3" });
  socket.deliver(new Uint8Array([1, 2, 3]).buffer);
  assert.equal(u.bytesAppended, 0);
  socket.deliver('{"type":"cancelled","id":"u3"}');
  await assert.rejects(u.done, (error) => error.code === "cancelled");
});

test("voices resolves with the list, or rejects with the server's error", async () => {
  const { client, socket } = connected();
  socket.open();
  const first = client.voices();
  const second = client.voices();
  socket.deliver('{"type":"voices","voices":[{"name":"espeak:fr","locale":"fr-FR","gender":"Male","engine":"espeak"}]}');
  socket.deliver('{"type":"error","id":null,"code":"upstream_unavailable","message":"down","for":"voices"}');
  assert.equal((await first)[0].name, "espeak:fr");
  await assert.rejects(second, (error) => error.code === "upstream_unavailable");
});

test("a lost connection rejects pending utterances and reconnects with backoff", async () => {
  FakeSocket.instances = [];
  const client = new TTSStreamClient("ws://test/v1/stream", {
    WebSocket: FakeSocket,
    maxBackoffMs: 20,
  });
  const socket = FakeSocket.instances[0];
  socket.open();
  const u = client.speak("x", { id: "u4" });
  socket.close(1006);
  await assert.rejects(u.done, (error) => error.code === "connection_lost");
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(FakeSocket.instances.length, 2, "reconnected once");
  assert.deepEqual(FakeSocket.instances[1].sent, [], "nothing is resent");
  client.close();
});

test("no reconnection after a normal close", async () => {
  FakeSocket.instances = [];
  new TTSStreamClient("ws://test/v1/stream", { WebSocket: FakeSocket, maxBackoffMs: 10 });
  FakeSocket.instances[0].open();
  FakeSocket.instances[0].close(1000);
  await new Promise((resolve) => setTimeout(resolve, 40));
  assert.equal(FakeSocket.instances.length, 1);
});

test("a refused handshake is diagnosed and not retried", async () => {
  FakeSocket.instances = [];
  const originalFetch = globalThis.fetch;
  globalThis.fetch = async () => new Response("{}", { status: 401 });
  try {
    const client = new TTSStreamClient("ws://test/v1/stream", {
      WebSocket: FakeSocket,
      apiKey: "wrong",
      maxBackoffMs: 10,
    });
    const errors = [];
    client.addEventListener("error", (event) => errors.push(event.detail));
    const u = client.speak("x");
    FakeSocket.instances[0].close(1006);
    await assert.rejects(u.done, (error) => error.code === "unauthorized");
    await new Promise((resolve) => setTimeout(resolve, 40));
    assert.equal(errors[0].message, "the server refused the API key");
    assert.equal(FakeSocket.instances.length, 1, "no retry after 401");
  } finally {
    globalThis.fetch = originalFetch;
  }
});
