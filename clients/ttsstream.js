// @ts-check
/**
 * ttsstream browser client: streaming speech with word timings.
 *
 * One ES module, no build step, no dependencies. It speaks protocol v1
 * (docs/protocol.md): connect, send `speak`, receive MP3 chunks that play
 * while they arrive (Media Source Extensions), and word events that follow
 * the audio element's playback clock.
 *
 *     import { TTSStreamClient } from "/clients/ttsstream.js";
 *     const client = new TTSStreamClient("wss://tts.example.com/v1/stream", { apiKey });
 *     const u = client.speak("Hello, world!", { voice: "en-US-AriaNeural" });
 *     u.addEventListener("wordchange", (e) => highlight(e.detail));
 *     await u.done;
 *
 * A connection that drops (the network went away) is opened again and resumed: the
 * utterances go on from the byte and the message where they stopped (see
 * `TTSStreamClient`'s `resumed` event).
 *
 * @module ttsstream
 */

/**
 * @typedef {object} Voice  One voice of the `voices` message.
 * @property {string} name
 * @property {string} locale
 * @property {string} gender
 * @property {"edge" | "espeak"} engine
 */

/**
 * @typedef {object} HelloMessage
 * @property {"hello"} type
 * @property {number} protocol
 * @property {string} server
 * @property {string} default_voice
 * @property {number} max_text_length
 * @property {string} [session]        this connection's token for a resume
 * @property {number} [resume_window]  seconds the server keeps a dropped connection
 */

/**
 * @typedef {object} StartMessage
 * @property {"start"} type
 * @property {string} id
 * @property {string} voice
 * @property {string} format       the MIME type of the audio sent
 * @property {string} format_name  the short name (mp3, webm, opus…)
 * @property {number} sample_rate
 * @property {boolean} cached
 * @property {string} engine
 * @property {boolean} fallback
 * @property {string | null} fallback_reason
 */

/**
 * @typedef {object} WordMessage
 * @property {"word"} type
 * @property {string} id
 * @property {string} text
 * @property {number} offset_ms
 * @property {number} duration_ms
 * @property {number | null} char_start  Code point index in the text sent.
 * @property {number | null} char_end
 */

/**
 * Several words at once: this client asks for them (`"words": "batch"`) and
 * hands them on as one `word` event each.
 * @typedef {object} WordsMessage
 * @property {"words"} type
 * @property {string} id
 * @property {Omit<WordMessage, "type" | "id">[]} words
 */

/**
 * @typedef {object} EndMessage
 * @property {"end"} type
 * @property {string} id
 * @property {number} bytes
 * @property {number} audio_ms
 * @property {number} words
 * @property {boolean} cached
 * @property {number} ttfb_ms
 */

/**
 * @typedef {object} ErrorMessage
 * @property {"error"} type
 * @property {string | null} id
 * @property {string} code
 * @property {string} message
 * @property {string} [for]     the type of the client message refused (ends no utterance)
 * @property {number} [retry_after]
 * @property {string} [reason]  of `resume_failed`
 */

/**
 * The answer to a `resume`: the utterances that go on, each from its `offset` (a
 * streaming one says the characters of its text `received`), and those `lost`.
 * @typedef {object} ResumedMessage
 * @property {"resumed"} type
 * @property {string} session  the token for the next resume
 * @property {Array<{id: string, offset: number, received?: number}>} utterances
 * @property {string[]} lost
 */

/**
 * @typedef {object} CancelledMessage
 * @property {"cancelled"} type
 * @property {string} id
 */

/**
 * @typedef {object} VoicesMessage
 * @property {"voices"} type
 * @property {Voice[]} voices
 */

/**
 * @typedef {HelloMessage | StartMessage | WordMessage | WordsMessage | EndMessage
 *   | ErrorMessage | CancelledMessage | VoicesMessage | ResumedMessage} ServerMessage
 */

/**
 * @typedef {object} SpeakOptions
 * @property {string} [voice]
 * @property {string} [rate]   e.g. "+10%"
 * @property {string} [volume] e.g. "-20%"
 * @property {string} [pitch]  e.g. "+5Hz"
 * @property {string} [id]     1 to 64 characters; made up when missing
 * @property {string} [format] as the client's `format` option, for this utterance
 * @property {boolean} [stream] text comes later with write() (see `client.stream()`)
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [apiKey]          Sent as the `key.<key>` subprotocol.
 * @property {boolean} [apiKeyInUrl]    Send the key as `?api_key=` instead (least safe).
 * @property {string[]} [protocols]     More subprotocols to offer.
 * @property {boolean} [reconnect]      Reconnect after an abnormal close (default true).
 * @property {number} [maxBackoffMs]    Longest wait between reconnections (default 30000).
 * @property {boolean} [resume]         Resume the utterances of a dropped connection
 *   (default true; needs `reconnect` and a server that resumes).
 * @property {string} [clientId]        Sent as `?client=` on every connection, so that a
 *   proxy in front of several servers sends a resume to the one holding it (default:
 *   a random id of this client's own).
 * @property {boolean} [autoplay]       Call `audio.play()` when audio starts (default true).
 * @property {string} [format]          "mp3" (default), "webm" (Opus: a third less
 *   bandwidth; mp3 where Media Source Extensions cannot play WebM Opus), or another
 *   format of docs/protocol.md, played once complete.
 * @property {typeof WebSocket} [WebSocket]  For tests: a WebSocket implementation.
 */

export const SUBPROTOCOL = "ttsstream.v1";
/** The Media Source Extensions type of each format the client plays as it arrives. */
const STREAMED_TYPES = /** @type {Record<string, string>} */ ({
  mp3: "audio/mpeg",
  webm: 'audio/webm; codecs="opus"',
});

/**
 * Whether Media Source Extensions play `type` here.
 * @param {string | undefined} type
 */
function streamable(type) {
  return (
    type !== undefined &&
    typeof MediaSource === "function" &&
    typeof MediaSource.isTypeSupported === "function" &&
    MediaSource.isTypeSupported(type)
  );
}

/**
 * The format to ask for: `requested`, except WebM where it cannot stream (then MP3).
 * @param {string | undefined} requested
 */
export function formatToAsk(requested) {
  const format = requested ?? "mp3";
  return format === "webm" && !streamable(STREAMED_TYPES.webm) ? "mp3" : format;
}
const FIRST_BACKOFF_MS = 500;
/** Reconnecting a dropped connection to resume it: 0.25 s, doubling to 5 s at most. */
const RESUME_FIRST_BACKOFF_MS = 250;
const RESUME_MAX_BACKOFF_MS = 5000;
/** The close code of a connection that ended without a closing handshake. */
const CLOSED_ABNORMALLY = 1006;
const KNOWN_TYPES = new Set([
  "hello",
  "start",
  "word",
  "words",
  "end",
  "error",
  "cancelled",
  "voices",
  "resumed",
]);
/** The messages the server keeps of an utterance for a resume (and counts in `frames`). */
const COUNTED_TYPES = new Set(["start", "word", "words", "end", "error"]);

/** A random id for `?client=`: 16 bytes, hexadecimal. */
function randomId() {
  const bytes = new Uint8Array(16);
  if (typeof crypto !== "undefined" && typeof crypto.getRandomValues === "function") {
    crypto.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Parse a server text frame; `null` for anything that is not a known message
 * (clients must ignore unknown types and fields).
 * @param {string} data
 * @returns {ServerMessage | null}
 */
export function parseServerMessage(data) {
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return null;
  }
  if (!message || typeof message !== "object" || !KNOWN_TYPES.has(message.type)) return null;
  return /** @type {ServerMessage} */ (message);
}

/**
 * Index of the word being spoken at `timeMs` of the audio, or -1.
 *
 * A word is current from its offset until the next word's offset (pauses
 * included), so the highlight never flickers off between words; before the
 * first word and after the last word's end it is -1.
 * @param {ReadonlyArray<{offset_ms: number, duration_ms: number}>} words  In order.
 * @param {number} timeMs
 * @returns {number}
 */
export function wordAt(words, timeMs) {
  let low = 0;
  let high = words.length - 1;
  let found = -1;
  while (low <= high) {
    const middle = (low + high) >> 1;
    if (words[middle].offset_ms <= timeMs) {
      found = middle;
      low = middle + 1;
    } else {
      high = middle - 1;
    }
  }
  if (found === words.length - 1 && found >= 0) {
    const last = words[found];
    if (timeMs >= last.offset_ms + last.duration_ms) return -1;
  }
  return found;
}

/**
 * Slice `text` by code point indices, as the server counts them.
 * @param {string} text
 * @param {number} start
 * @param {number} end
 */
export function sliceCodePoints(text, start, end) {
  return Array.from(text).slice(start, end).join("");
}

/** Error of an utterance or a connection, with the protocol's stable `code`. */
export class TTSStreamError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number} [retryAfter]
   */
  constructor(code, message, retryAfter) {
    super(message);
    this.name = "TTSStreamError";
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/**
 * Plays one utterance's audio chunks as they arrive: Media Source Extensions when the
 * browser supports the format in them (`audio/mpeg`, WebM Opus), else one blob once
 * the audio is complete.
 */
class Player {
  /**
   * @param {boolean} autoplay
   * @param {string} format  the short name asked for
   */
  constructor(autoplay, format = "mp3") {
    this.autoplay = autoplay;
    this.format = format;
    const type = STREAMED_TYPES[format];
    /** @type {HTMLAudioElement | null} */
    this.audio = typeof Audio === "function" ? new Audio() : null;
    /** @type {Uint8Array[]} */
    this.queue = [];
    /** @type {Uint8Array[]} */
    this.all = [];
    this.bytesAppended = 0;
    this.playRequested = false;
    this.ended = false;
    this.stopped = false;
    /** @type {SourceBuffer | null} */
    this.buffer = null;
    /** @type {MediaSource | null} */
    this.source = null;
    this.streaming = this.audio !== null && streamable(type);
    if (this.streaming && this.audio) {
      const source = new MediaSource();
      this.source = source;
      this.audio.src = URL.createObjectURL(source);
      source.addEventListener(
        "sourceopen",
        () => {
          this.buffer = source.addSourceBuffer(type);
          this.buffer.addEventListener("updateend", () => this.drain());
          this.drain();
        },
        { once: true },
      );
    }
  }

  /** @param {Uint8Array} chunk */
  append(chunk) {
    if (this.stopped) return;
    if (this.streaming) {
      this.queue.push(chunk);
      this.drain();
    } else {
      this.all.push(chunk);
    }
  }

  /** Append what is queued, one chunk per `updateend`; end the stream once all is in. */
  drain() {
    const buffer = this.buffer;
    if (!buffer || buffer.updating || this.stopped) return;
    const chunk = this.queue.shift();
    if (chunk) {
      buffer.appendBuffer(chunk);
      this.bytesAppended += chunk.byteLength;
      if (this.autoplay && this.audio && this.audio.paused && !this.playRequested) {
        this.playRequested = true;
        this.audio.play().catch(() => {});
      }
      return;
    }
    if (this.ended && this.source && this.source.readyState === "open") {
      this.source.endOfStream();
    }
  }

  /** The utterance's audio is complete. */
  finish() {
    this.ended = true;
    if (this.streaming) {
      this.drain();
    } else if (this.audio && !this.stopped) {
      const blob = new Blob(/** @type {BlobPart[]} */ (this.all), {
        type: STREAMED_TYPES[this.format] ?? "",
      });
      this.audio.src = URL.createObjectURL(blob);
      this.bytesAppended = blob.size;
      if (this.autoplay) this.audio.play().catch(() => {});
    }
  }

  stop() {
    this.stopped = true;
    this.queue = [];
    if (this.audio) this.audio.pause();
  }
}

/**
 * One utterance: an EventTarget with events `start`, `word`, `wordchange`, `end`,
 * `error` and `cancelled` (each a CustomEvent whose `detail` is the message, or for
 * `wordchange` the current word or null).
 */
export class Utterance extends EventTarget {
  /**
   * @param {TTSStreamClient} client
   * @param {string} id
   * @param {string} text
   * @param {boolean} autoplay
   * @param {string} [format]  the short name asked for
   */
  constructor(client, id, text, autoplay, format = "mp3") {
    super();
    this.client = client;
    this.id = id;
    this.text = text;
    /** @type {StartMessage | null} */
    this.start = null;
    /** @type {EndMessage | null} */
    this.end = null;
    /** @type {WordMessage[]} */
    this.words = [];
    this.state = /** @type {"queued" | "playing" | "ended" | "failed" | "cancelled"} */ (
      "queued"
    );
    this.player = new Player(autoplay, format);
    /** The element that plays this utterance (null outside a browser). */
    this.audio = this.player.audio;
    this.currentIndex = -1;
    /** @type {(value: EndMessage) => void} */
    let resolve = () => {};
    /** @type {(reason: Error) => void} */
    let reject = () => {};
    /** Resolves with `end`, rejects with a TTSStreamError on error or cancel. */
    this.done = new Promise((ok, fail) => {
      resolve = ok;
      reject = fail;
    });
    this.done.catch(() => {}); // callers that never await it do not see an unhandled rejection
    this.resolve = resolve;
    this.reject = reject;
    this.frame = 0;
    /** Made by `client.stream()`: text comes with write(). */
    this.streaming = false;
    /** Audio bytes received from the server (a resume goes on from there). */
    this.audioReceived = 0;
    /** JSON messages received about it that the server counts for a resume. */
    this.framesReceived = 0;
    /** Its `speak` went out on a connection (so the server may have it). */
    this.asked = false;
    /** `cancel()` was called: a resume asks again if no `cancelled` came. */
    this.cancelRequested = false;
    /** Streaming: `finish()` was called. */
    this.textFinished = false;
    if (this.audio) {
      this.audio.addEventListener("play", () => this.followClock());
      this.audio.addEventListener("seeked", () => this.updateWord());
      this.audio.addEventListener("ended", () => this.updateWord());
    }
  }

  /** Bytes of audio handed to the audio element so far. */
  get bytesAppended() {
    return this.player.bytesAppended;
  }

  /** The word at the audio element's current playback time, or null. */
  currentWord() {
    if (!this.audio) return null;
    const index = wordAt(this.words, this.audio.currentTime * 1000);
    return index >= 0 ? this.words[index] : null;
  }

  /**
   * Streaming utterances (`client.stream()`): add text, spoken as it completes sentences.
   * @param {string} text  appended verbatim (send your own spaces)
   */
  write(text) {
    this.requireStream();
    this.text += text;
    this.client.send({ type: "append", id: this.id, text });
  }

  /** Streaming utterances: speak what is buffered now, even mid-sentence. */
  flush() {
    this.requireStream();
    this.client.send({ type: "flush", id: this.id });
  }

  /** Streaming utterances: no more text; the rest is spoken, then `end`. */
  finish() {
    this.requireStream();
    this.textFinished = true;
    this.client.send({ type: "finish", id: this.id });
  }

  /** @private */
  requireStream() {
    if (!this.streaming) {
      throw new TypeError("write/flush/finish are for client.stream() utterances");
    }
  }

  /** Stop playing and ask the server to cancel; no more audio is appended. */
  cancel() {
    if (this.state === "ended" || this.state === "failed" || this.state === "cancelled") return;
    this.player.stop();
    this.cancelRequested = true;
    this.client.send({ type: "cancel", id: this.id });
  }

  /** @param {ServerMessage} message */
  handle(message) {
    switch (message.type) {
      case "start":
        this.start = message;
        this.state = "playing";
        this.emit("start", message);
        break;
      case "word":
        this.words.push(message);
        this.emit("word", message);
        break;
      case "words":
        for (const fields of message.words) {
          /** @type {WordMessage} */
          const word = { type: "word", id: message.id, ...fields };
          this.words.push(word);
          this.emit("word", word);
        }
        break;
      case "end":
        this.end = message;
        this.state = "ended";
        this.player.finish();
        this.emit("end", message);
        this.resolve(message);
        break;
      case "error":
        this.fail(new TTSStreamError(message.code, message.message, message.retry_after));
        break;
      case "cancelled":
        this.state = "cancelled";
        this.player.stop();
        this.emit("cancelled", message);
        this.reject(new TTSStreamError("cancelled", "the utterance was cancelled"));
        break;
      default:
        break;
    }
  }

  /** @param {Uint8Array} chunk */
  audioChunk(chunk) {
    if (this.state === "playing") this.player.append(chunk);
  }

  /** @param {TTSStreamError} error */
  fail(error) {
    if (this.state === "ended" || this.state === "failed" || this.state === "cancelled") return;
    this.state = "failed";
    this.player.finish();
    this.emit("error", error);
    this.reject(error);
  }

  /** Follow the playback clock with animation frames while the audio plays. */
  followClock() {
    if (typeof requestAnimationFrame !== "function") return;
    const tick = () => {
      this.updateWord();
      if (this.audio && !this.audio.paused && !this.audio.ended) {
        this.frame = requestAnimationFrame(tick);
      }
    };
    cancelAnimationFrame(this.frame);
    this.frame = requestAnimationFrame(tick);
  }

  updateWord() {
    if (!this.audio) return;
    const index = wordAt(this.words, this.audio.currentTime * 1000);
    if (index !== this.currentIndex) {
      this.currentIndex = index;
      this.emit("wordchange", index >= 0 ? this.words[index] : null);
    }
  }

  /**
   * @param {string} type
   * @param {unknown} detail
   */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/**
 * A connection to a ttsstream server. Events: `open` (detail: the hello message),
 * `close` (detail: {code, reason, resuming}), `error` (detail: a TTSStreamError),
 * `reconnecting` and `resumed` (below).
 *
 * When the connection drops without a close (close code 1006: the network went away,
 * the phone changed networks) while utterances are unfinished, and the server keeps
 * dropped connections (its `hello` has a `session`), the client does not fail them:
 * it fires `reconnecting` (detail: {code, reason, utterances}), reconnects (after
 * 0.25 s, doubling to 5 s, for as long as the server's `resume_window`) and sends
 * `resume` with what it received of each. They go on from exactly there: audio into
 * the same player, the word events that follow, nothing twice. Then it fires `resumed`
 * (detail: {utterances, lost, position, session}: the utterances going on, the ids of
 * those the server could not continue, which fail with `connection_lost`, and the
 * playing utterance's playback position in seconds). A resume the server refuses
 * fails them with `resume_failed` (and fires `error`); past the window they fail with
 * `connection_lost`.
 */
export class TTSStreamClient extends EventTarget {
  /**
   * @param {string} url  `ws://` or `wss://…/v1/stream`
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this.WebSocket = options.WebSocket ?? WebSocket;
    /** @type {HelloMessage | null} */
    this.hello = null;
    /** @type {Map<string, Utterance>} */
    this.utterances = new Map();
    /** @type {Utterance | null} The utterance whose audio is arriving. */
    this.current = null;
    /** @type {Array<{resolve: (voices: Voice[]) => void, reject: (error: Error) => void}>} */
    this.voiceRequests = [];
    /** @type {Array<Record<string, any>>} Messages waiting for the connection. */
    this.outbox = [];
    this.closed = false;
    this.attempt = 0;
    this.counter = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    /** @type {WebSocket | null} */
    this.socket = null;
    /** Sent as `?client=`: the same on every connection of this client. */
    this.clientId = options.clientId ?? randomId();
    /** @type {string | null} The token that resumes this connection if it drops. */
    this.session = null;
    /** Seconds the server keeps a dropped connection (`hello`'s `resume_window`). */
    this.resumeWindow = 0;
    /**
     * A dropped connection being resumed: until when (`Date.now()`), and the ids of the
     * utterances it had.
     * @type {{deadline: number, ids: string[]} | null}
     */
    this.outage = null;
    /** The socket is open and its `resume` waits for the answer. */
    this.resuming = false;
    this.connect();
  }

  connect() {
    const { apiKey, apiKeyInUrl, protocols = [] } = this.options;
    let url = this.url;
    const offered = [SUBPROTOCOL, ...protocols];
    const query = [];
    if (this.clientId && !/[?&]client=/.test(url)) {
      query.push("client=" + encodeURIComponent(this.clientId));
    }
    if (apiKey && apiKeyInUrl) {
      query.push("api_key=" + encodeURIComponent(apiKey));
    } else if (apiKey) {
      offered.push("key." + apiKey);
    }
    if (query.length) url += (url.includes("?") ? "&" : "?") + query.join("&");
    const socket = new this.WebSocket(url, offered);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
      if (this.outage) {
        this.sendResume();
        return;
      }
      this.attempt = 0;
      this.flushOutbox();
    });
    socket.addEventListener("message", (event) => this.receive(event.data));
    socket.addEventListener("close", (event) => this.lost(event.code, event.reason, opened));
  }

  /**
   * Speak `text`; the utterance plays as its audio arrives.
   * @param {string} text
   * @param {SpeakOptions} [options]
   * @returns {Utterance}
   */
  speak(text, options = {}) {
    const id = options.id ?? `c${++this.counter}-${Date.now().toString(36)}`;
    const format = formatToAsk(options.format ?? this.options.format);
    const utterance = new Utterance(this, id, text, this.options.autoplay ?? true, format);
    utterance.streaming = Boolean(options.stream);
    if (this.closed) {
      utterance.fail(new TTSStreamError("closed", "the client is closed"));
      return utterance;
    }
    this.utterances.set(id, utterance);
    /** @type {Record<string, string>} */
    // Batched words: the same word events, in fewer frames.
    const message = { type: "speak", id, text, words: "batch" };
    for (const field of /** @type {const} */ (["voice", "rate", "volume", "pitch"])) {
      const value = options[field];
      if (value) message[field] = value;
    }
    if (format !== "mp3") message.format = format;
    if (options.stream) message.stream = true;
    this.send(message);
    return utterance;
  }

  /**
   * A streaming utterance: text written while it is spoken (an LLM's reply), spoken
   * sentence by sentence as one utterance, with one timeline of words.
   *
   *     const u = client.stream({ voice: "en-US-AriaNeural" });
   *     u.write("Hello "); u.write("world. "); u.flush(); u.end();
   *
   * @param {SpeakOptions} [options]
   * @returns {Utterance}  plays as it arrives; `write`, `flush`, `end` (or `finish`) feed it
   */
  stream(options = {}) {
    const utterance = this.speak("", { ...options, stream: true });
    // `u.end()` finishes the text until the `end` message arrives; then `u.end` is that
    // message, as for every utterance. `u.finish()` does the same at any time.
    /** @type {any} */ (utterance).end = () => utterance.finish();
    return utterance;
  }

  /**
   * The server's voices.
   * @returns {Promise<Voice[]>}
   */
  voices() {
    return new Promise((resolve, reject) => {
      this.voiceRequests.push({ resolve, reject });
      this.send({ type: "voices" });
    });
  }

  /** Close for good: no reconnection; pending utterances reject. */
  close() {
    this.closed = true;
    this.outage = null;
    this.resuming = false;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
    this.failAll(new TTSStreamError("closed", "the client was closed"));
  }

  /**
   * Send `message` now, or once the connection is (back) up.
   * @param {Record<string, any>} message
   */
  send(message) {
    if (this.socket && this.socket.readyState === this.WebSocket.OPEN && !this.resuming) {
      this.transmit(message);
    } else {
      this.outbox.push(message);
    }
  }

  /**
   * Write `message` on the open socket.
   * @param {Record<string, any>} message
   */
  transmit(message) {
    if (!this.socket) {
      this.outbox.push(message);
      return;
    }
    this.socket.send(JSON.stringify(message));
    if (message.type === "speak") {
      const utterance = this.utterances.get(message.id);
      if (utterance) utterance.asked = true;
    }
  }

  flushOutbox() {
    for (const message of this.outbox.splice(0)) this.transmit(message);
  }

  /** @param {string | ArrayBuffer} data */
  receive(data) {
    if (typeof data !== "string") {
      const current = this.current;
      if (current) {
        const chunk = new Uint8Array(data);
        current.audioReceived += chunk.byteLength;
        current.audioChunk(chunk);
      }
      return;
    }
    const message = parseServerMessage(data);
    if (!message) return;
    switch (message.type) {
      case "hello":
        this.hello = message;
        // A resuming connection goes on with the dropped one's session, not its own.
        if (!this.resuming) this.session = message.session ?? null;
        this.resumeWindow = message.resume_window ?? 0;
        this.dispatchEvent(new CustomEvent("open", { detail: message }));
        return;
      case "resumed":
        this.resumed(message);
        return;
      case "voices": {
        const request = this.voiceRequests.shift();
        if (request) request.resolve(message.voices);
        return;
      }
      case "error":
        if (message.code === "resume_failed") {
          this.resumeFailed(message);
          return;
        }
        // "for" names the type of a refused message: such an error ends no utterance.
        if (message.for === "voices" || (message.for === undefined && message.id === null)) {
          const request = this.voiceRequests.shift();
          if (request) request.reject(new TTSStreamError(message.code, message.message));
          return;
        }
        if (message.for !== undefined) {
          // A refused speak fails the utterance it would have made, never one in progress.
          const refused = this.utterances.get(/** @type {string} */ (message.id));
          if (message.for === "speak" && refused && refused.state === "queued") break;
          const gone = message.for === "cancel" && message.code === "not_found";
          if (gone && refused?.cancelRequested) {
            // The server has it no more (cancelled while the connection was down, its
            // `cancelled` lost with it): nothing more of it comes.
            this.settle(refused, { type: "cancelled", id: refused.id });
            return;
          }
          // A refused append, flush or finish: told to its utterance, which goes on.
          if (refused) refused.emit("refused", message);
          return;
        }
        break;
      default:
        break;
    }
    const utterance = this.utterances.get(/** @type {string} */ (message.id));
    if (!utterance) return;
    if (COUNTED_TYPES.has(message.type)) utterance.framesReceived += 1;
    if (message.type === "start") this.current = utterance;
    this.settle(utterance, message);
  }

  /**
   * Hand `message` to `utterance`; forget it once it is over.
   * @param {Utterance} utterance
   * @param {ServerMessage} message
   */
  settle(utterance, message) {
    utterance.handle(message);
    if (message.type === "end" || message.type === "error" || message.type === "cancelled") {
      if (this.current === utterance) this.current = null;
      if (utterance.state !== "playing") this.utterances.delete(utterance.id);
    }
  }

  /**
   * The connection closed: resume what was pending if it dropped, else fail it; and
   * reconnect after an abnormal close, but not after a normal one or a refused
   * handshake.
   * @param {number} code
   * @param {string} reason
   * @param {boolean} opened
   */
  async lost(code, reason, opened) {
    this.socket = null;
    this.current = null;
    this.resuming = false;
    if (!this.closed && this.outage === null && opened && this.resumable(code)) {
      this.dropped(code, reason);
      return;
    }
    if (!this.closed && this.outage !== null) {
      await this.resumeAttemptFailed(code, reason, opened);
      return;
    }
    let error;
    let refused = false;
    if (!opened && !this.closed) {
      error = await this.diagnose();
      refused = ["unauthorized", "origin_not_allowed"].includes(error.code);
    } else {
      error = closeError(code, reason);
    }
    this.failAll(error);
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, resuming: false } }));
    if (!this.closed && !opened) this.dispatchEvent(new CustomEvent("error", { detail: error }));
    if (this.closed || refused) return;
    this.reconnect(code);
  }

  /**
   * After an abnormal close, connect again with exponential backoff.
   * @param {number} code
   */
  reconnect(code) {
    if (code === 1000 || this.options.reconnect === false) return;
    const delay = Math.min(
      this.options.maxBackoffMs ?? 30000,
      FIRST_BACKOFF_MS * 2 ** this.attempt++,
    );
    this.timer = setTimeout(() => this.connect(), delay * (0.5 + Math.random() / 2));
  }

  /**
   * Whether a connection that closed with `code` is one to resume: it dropped, the
   * server keeps dropped connections, and utterances it was asked for are unfinished.
   * @param {number} code
   */
  resumable(code) {
    return (
      code === CLOSED_ABNORMALLY &&
      this.options.reconnect !== false &&
      this.options.resume !== false &&
      Boolean(this.session) &&
      this.resumeWindow > 0 &&
      [...this.utterances.values()].some((utterance) => utterance.asked)
    );
  }

  /**
   * The connection dropped: keep its utterances (they go on playing what they have)
   * and reconnect to resume them.
   * @param {number} code
   * @param {string} reason
   */
  dropped(code, reason) {
    const waiting = [...this.utterances.values()].filter((utterance) => utterance.asked);
    this.outage = {
      deadline: Date.now() + this.resumeWindow * 1000,
      ids: waiting.map((utterance) => utterance.id),
    };
    this.attempt = 0;
    // The answers to the `voices` requests sent are lost with the connection; those
    // still to be sent go out on the next one.
    const unsent = this.outbox.filter((message) => message.type === "voices").length;
    const error = closeError(code, reason);
    for (const request of this.voiceRequests.splice(0, this.voiceRequests.length - unsent)) {
      request.reject(error);
    }
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, resuming: true } }));
    this.dispatchEvent(
      new CustomEvent("reconnecting", { detail: { code, reason, utterances: waiting } }),
    );
    this.retryResume();
  }

  /** Try again to connect and resume, with backoff, within the server's window. */
  retryResume() {
    const outage = /** @type {{deadline: number, ids: string[]}} */ (this.outage);
    const longest = Math.min(RESUME_MAX_BACKOFF_MS, this.options.maxBackoffMs ?? Infinity);
    const backoff = Math.min(longest, RESUME_FIRST_BACKOFF_MS * 2 ** this.attempt++);
    const delay = Math.min(backoff * (0.5 + Math.random() / 2), outage.deadline - Date.now());
    this.timer = setTimeout(() => this.connect(), Math.max(0, delay));
  }

  /**
   * A connection meant to resume failed (it never opened, or closed before the
   * answer): try again while the window lasts, else fail what it had.
   * @param {number} code
   * @param {string} reason
   * @param {boolean} opened
   */
  async resumeAttemptFailed(code, reason, opened) {
    let error = null;
    const notYet = this.notYet;
    this.notYet = false;
    if (notYet) {
      // Closed by this client to ask again (the server did not know the drop yet).
    } else if (!opened) {
      const why = await this.diagnose();
      if (["unauthorized", "origin_not_allowed"].includes(why.code)) error = why;
    } else if (code !== CLOSED_ABNORMALLY) {
      error = closeError(code, reason); // the server closed it: nothing to come back to
    }
    const outage = this.outage;
    if (this.closed || outage === null) return;
    const retry = error === null && Date.now() < outage.deadline;
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, resuming: retry } }));
    if (retry) {
      this.retryResume();
      return;
    }
    error ??= new TTSStreamError(
      "connection_lost",
      "the connection was lost and could not be resumed in time",
    );
    this.endOutage(error);
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
    if (["unauthorized", "origin_not_allowed"].includes(error.code)) return;
    this.attempt = 0;
    this.reconnect(code);
  }

  /** The socket that resumes is open: say where each utterance stopped. */
  sendResume() {
    const outage = /** @type {{deadline: number, ids: string[]}} */ (this.outage);
    const waiting = outage.ids
      .map((id) => this.utterances.get(id))
      .filter((utterance) => utterance !== undefined);
    if (!waiting.length || !this.session) {
      this.outage = null;
      this.flushOutbox();
      return;
    }
    this.resuming = true;
    /** @type {WebSocket} */ (this.socket).send(
      JSON.stringify({
        type: "resume",
        session: this.session,
        utterances: waiting.map((utterance) => ({
          id: utterance.id,
          offset: utterance.audioReceived,
          frames: utterance.framesReceived,
        })),
      }),
    );
  }

  /**
   * The server resumed the dropped connection: its utterances go on from where they
   * stopped; those it lost fail.
   * @param {ResumedMessage} message
   */
  resumed(message) {
    const outage = this.outage;
    if (!this.resuming || outage === null) return;
    this.resuming = false;
    this.outage = null;
    this.attempt = 0;
    if (message.session) this.session = message.session;
    const entries = new Map((message.utterances ?? []).map((entry) => [entry.id, entry]));
    /** @type {string[]} */
    const lost = [];
    for (const id of outage.ids) {
      const utterance = this.utterances.get(id);
      if (!utterance || entries.has(id)) continue;
      lost.push(id);
      this.forget(
        utterance,
        new TTSStreamError(
          "connection_lost",
          "the connection was lost and the server could not resume this utterance",
        ),
      );
    }
    /** @type {Utterance[]} */
    const going = [];
    for (const entry of entries.values()) {
      const utterance = this.utterances.get(entry.id);
      if (!utterance || !outage.ids.includes(entry.id)) continue;
      going.push(utterance);
      // Audio that comes without a `start` belongs to the utterance that had begun.
      if (utterance.state === "playing" && this.current === null) this.current = utterance;
      if (utterance.streaming && typeof entry.received === "number") {
        this.resendText(utterance, entry.received);
      }
      if (utterance.cancelRequested) {
        // Its `cancel` may have been lost with the connection, or its `cancelled`.
        this.unqueue(utterance.id, ["cancel"]);
        this.transmit({ type: "cancel", id: utterance.id });
      }
    }
    this.flushOutbox();
    const playing = this.current?.audio;
    this.dispatchEvent(
      new CustomEvent("resumed", {
        detail: {
          utterances: going,
          lost,
          position: playing ? playing.currentTime : null,
          session: this.session,
        },
      }),
    );
  }

  /**
   * The server could not resume the dropped connection: its utterances fail with
   * `resume_failed`; the new connection goes on as a fresh one.
   * @param {ErrorMessage} message
   */
  resumeFailed(message) {
    if (!this.resuming || this.outage === null) return;
    if (message.reason === "unknown" && Date.now() < this.outage.deadline && this.socket) {
      // The server has not seen the drop yet (a network that went away sends no
      // reset: it notices at its next ping): close this one and ask again.
      this.resuming = false;
      this.notYet = true;
      this.socket.close(1000, "resume again");
      return;
    }
    this.resuming = false;
    this.attempt = 0;
    this.session = this.hello?.session ?? null;
    const error = new TTSStreamError(
      "resume_failed",
      `the connection was lost and could not be resumed (${message.reason ?? message.message})`,
    );
    this.endOutage(error);
    this.flushOutbox();
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
  }

  /**
   * Streaming: send again the text the server does not have (written while the
   * connection was down, or sent just before it dropped), then `finish` if it was.
   * @param {Utterance} utterance
   * @param {number} received  characters (code points) of its text the server has
   */
  resendText(utterance, received) {
    const flushed = this.unqueue(utterance.id, ["append", "flush", "finish"]).some(
      (message) => message.type === "flush",
    );
    const missing = Array.from(utterance.text).slice(received);
    const limit = this.hello?.max_text_length || 1000;
    for (let start = 0; start < missing.length; start += limit) {
      const text = missing.slice(start, start + limit).join("");
      this.transmit({ type: "append", id: utterance.id, text });
    }
    if (utterance.textFinished) {
      this.transmit({ type: "finish", id: utterance.id });
    } else if (flushed) {
      this.transmit({ type: "flush", id: utterance.id });
    }
  }

  /**
   * Take the messages of `types` about utterance `id` out of the outbox.
   * @param {string} id
   * @param {string[]} types
   * @returns {Array<Record<string, any>>}  those taken out
   */
  unqueue(id, types) {
    const taken = this.outbox.filter((m) => m.id === id && types.includes(m.type));
    this.outbox = this.outbox.filter((m) => !taken.includes(m));
    return taken;
  }

  /**
   * The dropped connection is not coming back: fail its utterances with `error`.
   * @param {TTSStreamError} error
   */
  endOutage(error) {
    const outage = this.outage;
    this.outage = null;
    if (outage === null) return;
    for (const id of outage.ids) {
      const utterance = this.utterances.get(id);
      if (utterance) this.forget(utterance, error);
    }
  }

  /**
   * Fail `utterance` and forget it, with what still waits to be sent about it.
   * @param {Utterance} utterance
   * @param {TTSStreamError} error
   */
  forget(utterance, error) {
    utterance.fail(error);
    this.utterances.delete(utterance.id);
    this.unqueue(utterance.id, ["append", "flush", "finish", "cancel"]);
  }

  /**
   * Why a handshake failed: browsers hide the HTTP status of a refused WebSocket,
   * so ask the same URL over HTTP (without the key) and read the refusal.
   * @returns {Promise<TTSStreamError>}
   */
  async diagnose() {
    const unreachable = new TTSStreamError(
      "unreachable",
      "could not connect: the server is unreachable or refused this page's origin",
    );
    if (typeof fetch !== "function") return unreachable;
    try {
      const response = await fetch(this.url.replace(/^ws/, "http"), { cache: "no-store" });
      if (response.status === 401) {
        return new TTSStreamError(
          "unauthorized",
          this.options.apiKey
            ? "the server refused the API key"
            : "the server needs an API key",
        );
      }
      if (response.status === 403) {
        return new TTSStreamError("origin_not_allowed", "this page's origin may not connect");
      }
      if (response.status === 429) {
        const retry = Number(response.headers.get("Retry-After")) || undefined;
        return new TTSStreamError("rate_limited", "too many requests; try again later", retry);
      }
      if (response.status === 503) {
        return new TTSStreamError("server_full", "the server is full; try again later");
      }
    } catch {
      return unreachable;
    }
    return unreachable;
  }

  /** @param {TTSStreamError} error */
  failAll(error) {
    for (const utterance of this.utterances.values()) utterance.fail(error);
    this.utterances.clear();
    for (const request of this.voiceRequests.splice(0)) request.reject(error);
    this.outbox = [];
  }
}

/**
 * The error of utterances cut off by a close with `code`.
 * @param {number} code
 * @param {string} reason
 */
function closeError(code, reason) {
  return new TTSStreamError(
    code === 1001 ? "going_away" : "connection_lost",
    code === 1001
      ? "the server is restarting; speak again in a moment"
      : `the connection was lost (${code}${reason ? ": " + reason : ""})`,
  );
}
