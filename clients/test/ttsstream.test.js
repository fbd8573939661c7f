// Unit tests of the client's pure logic and message handling: node --test clients/test/
import { mock, test } from "node:test";
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
  let { socket } = connected({ apiKey: "k1", clientId: "me" });
  assert.deepEqual(socket.protocols, ["ttsstream.v1", "key.k1"]);
  assert.equal(socket.url, "ws://test/v1/stream?client=me");
  ({ socket } = connected({ apiKey: "k 2", apiKeyInUrl: true, clientId: "me" }));
  assert.equal(socket.url, "ws://test/v1/stream?client=me&api_key=k%202");
  assert.deepEqual(socket.protocols, ["ttsstream.v1"]);
});

test("the URL names the client, with an id of its own, the same on every connection", () => {
  const { client, socket } = connected();
  const id = new URL(socket.url).searchParams.get("client");
  assert.match(id, /^[0-9a-f]{32}$/);
  assert.equal(client.clientId, id);
  assert.notEqual(connected().client.clientId, id, "each client has its own");
  assert.equal(connected({ clientId: "" }).socket.url, "ws://test/v1/stream");
  const named = new TTSStreamClient("ws://test/v1/stream?client=mine", { WebSocket: FakeSocket });
  assert.equal(FakeSocket.instances.at(-1).url, "ws://test/v1/stream?client=mine");
  named.close();
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

// Resuming a dropped connection (docs/protocol.md, "Resume after a dropped connection").

const START = { type: "start", voice: "v", format: "audio/mpeg", sample_rate: 24000, cached: false, engine: "edge", fallback: false, fallback_reason: null };
const word = (id, text, offset) => ({ type: "word", id, text, offset_ms: offset, duration_ms: 100, char_start: null, char_end: null });

/** Let pending promises (a diagnosis's fetch) settle. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/**
 * A client on fake sockets and fake timers, connected with a hello that offers resuming;
 * `random` pins the backoff's jitter at its longest.
 */
function resumable(options = {}, hello = { session: "tok1", resume_window: 30 }) {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 0 });
  mock.method(Math, "random", () => 1);
  mock.method(globalThis, "fetch", async () => {
    throw new TypeError("offline");
  });
  FakeSocket.instances = [];
  const client = new TTSStreamClient("ws://test/v1/stream", {
    WebSocket: FakeSocket,
    clientId: "me",
    ...options,
  });
  const events = [];
  for (const type of ["open", "close", "error", "reconnecting", "resumed"]) {
    client.addEventListener(type, (event) => events.push([type, event.detail]));
  }
  const first = FakeSocket.instances[0];
  first.open();
  first.deliver(JSON.stringify({ type: "hello", protocol: 1, server: "t", default_voice: "v", max_text_length: 5000, ...hello }));
  return { client, first, events, latest: () => FakeSocket.instances.at(-1) };
}

function restore() {
  mock.timers.reset();
  mock.restoreAll();
}

const json = (socket, message) => socket.deliver(JSON.stringify(message));
const audio = (socket, ...bytes) => socket.deliver(new Uint8Array(bytes).buffer);
const heard = (u) => (u.player.all.length ? Buffer.concat(u.player.all) : Buffer.alloc(0));

test("a dropped connection is resumed: the rest of the audio and words, nothing twice", async () => {
  const { client, first, events, latest } = resumable({ apiKey: "k1" });
  try {
    const u = client.speak("Hello big world", { id: "u1" });
    const words = [];
    u.addEventListener("word", (event) => words.push(event.detail.text));
    json(first, { ...START, id: "u1" });
    json(first, { type: "words", id: "u1", words: [word("u1", "Hello", 100)] });
    audio(first, 1, 2, 3);
    json(first, word("u1", "big", 400));
    audio(first, 4, 5);
    first.close(1006);
    assert.equal(u.state, "playing", "not failed: it is being resumed");
    const reconnecting = events.find(([type]) => type === "reconnecting");
    assert.deepEqual(reconnecting[1].utterances, [u]);
    assert.deepEqual(events.find(([type]) => type === "close")[1], { code: 1006, reason: "", resuming: true });

    mock.timers.tick(249);
    assert.equal(FakeSocket.instances.length, 1, "the first attempt after 0.25 s");
    mock.timers.tick(1);
    const second = latest();
    assert.equal(FakeSocket.instances.length, 2);
    assert.deepEqual(second.protocols, ["ttsstream.v1", "key.k1"], "the key goes again");
    assert.equal(second.url, first.url, "the same client id");
    second.open();
    assert.deepEqual(second.sent, [
      { type: "resume", session: "tok1", utterances: [{ id: "u1", offset: 5, frames: 3 }] },
    ]);
    const next = client.speak("Then this.", { id: "u2" });
    assert.equal(second.sent.length, 1, "nothing goes before the resume's answer");
    json(second, { type: "hello", protocol: 1, server: "t", default_voice: "v", max_text_length: 5000, session: "tok2", resume_window: 30 });
    assert.equal(client.session, "tok1", "the new connection's own token does not resume it");
    json(second, { type: "resumed", session: "tok3", utterances: [{ id: "u1", offset: 5 }], lost: [] });
    assert.equal(client.session, "tok3");
    assert.deepEqual(second.sent.slice(1).map((m) => [m.type, m.id]), [["speak", "u2"]]);
    const resumed = events.find(([type]) => type === "resumed")[1];
    assert.deepEqual(resumed.utterances, [u]);
    assert.deepEqual(resumed.lost, []);
    assert.equal(resumed.position, null, "no audio element outside a browser");

    audio(second, 6, 7); // no start again: the audio of the utterance that had begun
    json(second, word("u1", "world", 700));
    audio(second, 8);
    json(second, { type: "end", id: "u1", bytes: 8, audio_ms: 1, words: 3, cached: false, ttfb_ms: 1 });
    assert.equal((await u.done).bytes, 8);
    assert.deepEqual([...heard(u)], [1, 2, 3, 4, 5, 6, 7, 8], "one stream, each byte once");
    assert.deepEqual(words, ["Hello", "big", "world"]);
    assert.equal(u.audioReceived, 8);
    json(second, { ...START, id: "u2" });
    audio(second, 9);
    assert.equal(next.audioReceived, 1);
    assert.equal(events.filter(([type]) => type === "error").length, 0);
    client.close();
  } finally {
    restore();
  }
});

test("what the server lost fails with connection_lost; the rest goes on", async () => {
  const { client, first, events, latest } = resumable();
  try {
    const a = client.speak("a", { id: "a" });
    const b = client.speak("b", { id: "b" });
    json(first, { ...START, id: "a" });
    audio(first, 1);
    first.close(1006);
    mock.timers.tick(250);
    latest().open();
    assert.deepEqual(latest().sent[0].utterances, [
      { id: "a", offset: 1, frames: 1 },
      { id: "b", offset: 0, frames: 0 },
    ]);
    json(latest(), { type: "resumed", session: "tok1", utterances: [{ id: "b", offset: 0 }], lost: ["a"] });
    await assert.rejects(a.done, (error) => error.code === "connection_lost");
    assert.deepEqual(events.find(([type]) => type === "resumed")[1].lost, ["a"]);
    assert.equal(client.current, null, "audio now waits for b's start");
    audio(latest(), 2);
    json(latest(), { ...START, id: "b" });
    audio(latest(), 3);
    assert.equal(b.audioReceived, 1);
    assert.equal(b.state, "playing");
    client.close();
  } finally {
    restore();
  }
});

test("a refused resume fails them with resume_failed; the connection goes on as a new one", async () => {
  const { client, first, events, latest } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    json(first, { ...START, id: "u" });
    first.close(1006);
    const later = client.speak("y", { id: "later" }); // while the connection is down
    mock.timers.tick(250);
    latest().open();
    json(latest(), { type: "hello", protocol: 1, server: "t", default_voice: "v", max_text_length: 5000, session: "fresh", resume_window: 30 });
    json(latest(), { type: "error", id: null, code: "resume_failed", message: "no", reason: "not_yours" });
    await assert.rejects(u.done, (error) => error.code === "resume_failed" && /not_yours/.test(error.message));
    assert.equal(events.find(([type]) => type === "error")[1].code, "resume_failed");
    assert.equal(client.session, "fresh");
    assert.deepEqual(latest().sent.map((m) => [m.type, m.id]), [["resume", undefined], ["speak", "later"]]);
    json(latest(), { ...START, id: "later" });
    assert.equal(later.state, "playing");
    client.close();
  } finally {
    restore();
  }
});

test("a resume the server does not know yet (it has not seen the drop) is asked again", async () => {
  const { client, first, events, latest } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    json(first, { ...START, id: "u" });
    first.close(1006);
    mock.timers.tick(250);
    const early = latest();
    early.open();
    json(early, { type: "hello", protocol: 1, server: "t", default_voice: "v", max_text_length: 5000, session: "s2", resume_window: 30 });
    json(early, { type: "error", id: null, code: "resume_failed", message: "no", reason: "unknown" });
    await settle();
    assert.equal(early.readyState, 3); // closed by the client, to ask again
    assert.equal(events.filter(([type]) => type === "error").length, 0);
    mock.timers.tick(5000);
    const again = latest();
    assert.notEqual(again, early);
    again.open();
    json(again, { type: "hello", protocol: 1, server: "t", default_voice: "v", max_text_length: 5000, session: "s3", resume_window: 30 });
    assert.deepEqual(again.sent.at(-1).session, "tok1");
    json(again, { type: "resumed", session: "tok1", utterances: [{ id: "u", offset: 0 }], lost: [] });
    json(again, { type: "end", id: "u", bytes: 0, audio_ms: 0, words: 0, cached: false, ttfb_ms: 1 });
    await u.done;
    client.close();
  } finally {
    restore();
  }
});

test("attempts back off from 0.25 s to 5 s, and give up at the server's window", async () => {
  const { client, first, events, latest } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    json(first, { ...START, id: "u" });
    first.close(1006);
    const delays = [];
    let now = 0;
    while (delays.length < 20) {
      const count = FakeSocket.instances.length;
      let waited = 0;
      while (FakeSocket.instances.length === count && waited < 60000) {
        mock.timers.tick(50);
        waited += 50;
      }
      if (FakeSocket.instances.length === count) break;
      now += waited;
      delays.push(waited);
      latest().close(1006); // the handshake fails: the network is still away
      await settle();
      if (u.state === "failed") break;
    }
    assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000, 5000, 2250]);
    assert.equal(now, 30000);
    await assert.rejects(u.done, (error) => error.code === "connection_lost");
    assert.equal(events.filter(([type]) => type === "error").length, 1, "one error, at the end");
    assert.deepEqual(events.filter(([type]) => type === "reconnecting").length, 1);
    // Then connections as before (nothing to resume): 0.5 s, doubling.
    mock.timers.tick(500);
    latest().open();
    assert.deepEqual(latest().sent, []);
    client.close();
  } finally {
    restore();
  }
});

test("dropped again before the answer: tried again within the same window", async () => {
  const { client, first, latest } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    json(first, { ...START, id: "u" });
    audio(first, 1, 2);
    first.close(1006);
    mock.timers.tick(250);
    latest().open();
    latest().close(1006);
    mock.timers.tick(500);
    assert.equal(FakeSocket.instances.length, 3);
    latest().open();
    assert.deepEqual(latest().sent, [
      { type: "resume", session: "tok1", utterances: [{ id: "u", offset: 2, frames: 1 }] },
    ]);
    json(latest(), { type: "resumed", session: "tok1", utterances: [{ id: "u", offset: 2 }], lost: [] });
    assert.equal(u.state, "playing");
    client.close();
  } finally {
    restore();
  }
});

test("closes that are not drops fail at once, as before", async () => {
  for (const [hello, code, options, expected] of [
    [{}, 1006, {}, "connection_lost"], // a server that does not resume
    [{ session: "t", resume_window: 30 }, 1001, {}, "going_away"], // the server closed
    [{ session: "t", resume_window: 30 }, 1006, { resume: false }, "connection_lost"],
  ]) {
    const { client, first, latest } = resumable(options, hello);
    try {
      const u = client.speak("x", { id: "u" });
      json(first, { ...START, id: "u" });
      first.close(code);
      await assert.rejects(u.done, (error) => error.code === expected);
      mock.timers.tick(500);
      latest().open();
      assert.deepEqual(latest().sent, [], "no resume");
      client.close();
    } finally {
      restore();
    }
  }
  // With nothing unfinished there is nothing to resume: an ordinary reconnection.
  const { client, first, latest } = resumable();
  try {
    first.close(1006);
    mock.timers.tick(500);
    assert.equal(FakeSocket.instances.length, 2);
    latest().open();
    assert.deepEqual(latest().sent, []);
    client.close();
  } finally {
    restore();
  }
});

test("a streamed text goes on from the last character the server has, then finishes", async () => {
  const { client, first, latest } = resumable();
  try {
    const u = client.stream({ id: "s" });
    u.write("Hi 😀 ");
    u.write("there. ");
    json(first, { ...START, id: "s", stream: true });
    first.close(1006);
    u.write("More. "); // while the connection is down
    u.flush();
    u.end();
    mock.timers.tick(250);
    latest().open();
    // The server has "Hi " only: three code points.
    json(latest(), { type: "resumed", session: "tok1", utterances: [{ id: "s", offset: 0, received: 3 }], lost: [] });
    assert.deepEqual(latest().sent.slice(1), [
      { type: "append", id: "s", text: "😀 there. More. " },
      { type: "finish", id: "s" },
    ]);
    client.close();
  } finally {
    restore();
  }
});

test("a cancel lost with the connection is asked again; not_found settles it", async () => {
  const { client, first, latest } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    json(first, { ...START, id: "u" });
    first.close(1006);
    u.cancel(); // while the connection is down
    mock.timers.tick(250);
    latest().open();
    json(latest(), { type: "resumed", session: "tok1", utterances: [{ id: "u", offset: 0 }], lost: [] });
    assert.deepEqual(latest().sent.slice(1), [{ type: "cancel", id: "u" }], "once");
    json(latest(), { type: "error", id: "u", code: "not_found", message: "no", for: "cancel" });
    await assert.rejects(u.done, (error) => error.code === "cancelled");
    assert.equal(client.utterances.size, 0);
    client.close();
  } finally {
    restore();
  }
});

test("voices asked before the drop reject; those asked during it are answered after", async () => {
  const { client, first, latest } = resumable();
  try {
    client.speak("x", { id: "u" });
    const before = client.voices();
    first.close(1006);
    const during = client.voices();
    await assert.rejects(before, (error) => error.code === "connection_lost");
    mock.timers.tick(250);
    latest().open();
    json(latest(), { type: "resumed", session: "tok1", utterances: [{ id: "u", offset: 0 }], lost: [] });
    assert.deepEqual(latest().sent.slice(1), [{ type: "voices" }]);
    json(latest(), { type: "voices", voices: [{ name: "n", locale: "l", gender: "g", engine: "edge" }] });
    assert.equal((await during)[0].name, "n");
    client.close();
  } finally {
    restore();
  }
});

test("closing the client while it reconnects stops it and fails what was pending", async () => {
  const { client, first } = resumable();
  try {
    const u = client.speak("x", { id: "u" });
    first.close(1006);
    client.close();
    await assert.rejects(u.done, (error) => error.code === "closed");
    mock.timers.tick(60000);
    assert.equal(FakeSocket.instances.length, 1);
  } finally {
    restore();
  }
});
