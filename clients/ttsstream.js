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
 * @property {number} [retry_after]
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
 *   | ErrorMessage | CancelledMessage | VoicesMessage} ServerMessage
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
const KNOWN_TYPES = new Set([
  "hello",
  "start",
  "word",
  "words",
  "end",
  "error",
  "cancelled",
  "voices",
]);

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
 * `close` (detail: {code, reason}), `error` (detail: a TTSStreamError).
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
    /** @type {string[]} */
    this.outbox = [];
    this.closed = false;
    this.attempt = 0;
    this.counter = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    /** @type {WebSocket | null} */
    this.socket = null;
    this.connect();
  }

  connect() {
    const { apiKey, apiKeyInUrl, protocols = [] } = this.options;
    let url = this.url;
    const offered = [SUBPROTOCOL, ...protocols];
    if (apiKey && apiKeyInUrl) {
      url += (url.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(apiKey);
    } else if (apiKey) {
      offered.push("key." + apiKey);
    }
    const socket = new this.WebSocket(url, offered);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
      this.attempt = 0;
      for (const frame of this.outbox.splice(0)) socket.send(frame);
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
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
    this.failAll(new TTSStreamError("closed", "the client was closed"));
  }

  /** @param {object} message */
  send(message) {
    const frame = JSON.stringify(message);
    if (this.socket && this.socket.readyState === this.WebSocket.OPEN) {
      this.socket.send(frame);
    } else {
      this.outbox.push(frame);
    }
  }

  /** @param {string | ArrayBuffer} data */
  receive(data) {
    if (typeof data !== "string") {
      if (this.current) this.current.audioChunk(new Uint8Array(data));
      return;
    }
    const message = parseServerMessage(data);
    if (!message) return;
    switch (message.type) {
      case "hello":
        this.hello = message;
        this.dispatchEvent(new CustomEvent("open", { detail: message }));
        return;
      case "voices": {
        const request = this.voiceRequests.shift();
        if (request) request.resolve(message.voices);
        return;
      }
      case "error":
        // "for" names the type of a refused message: such an error ends no utterance.
        if (message.for === "voices" || (message.for === undefined && message.id === null)) {
          const request = this.voiceRequests.shift();
          if (request) request.reject(new TTSStreamError(message.code, message.message));
          return;
        }
        if (message.for !== undefined) {
          // A refused speak fails the utterance it would have made, never one in progress.
          const refused = this.utterances.get(message.id);
          if (message.for === "speak" && refused && refused.state === "queued") break;
          // A refused append, flush or finish: told to its utterance, which goes on.
          if (refused) refused.emit("refused", message);
          return;
        }
        break;
      default:
        break;
    }
    const utterance = this.utterances.get(message.id);
    if (!utterance) return;
    if (message.type === "start") this.current = utterance;
    utterance.handle(message);
    if (message.type === "end" || message.type === "error" || message.type === "cancelled") {
      if (this.current === utterance) this.current = null;
      if (utterance.state !== "playing") this.utterances.delete(message.id);
    }
  }

  /**
   * The connection closed: fail what was pending, and reconnect after an abnormal
   * close, but not after a normal one or a refused handshake.
   * @param {number} code
   * @param {string} reason
   * @param {boolean} opened
   */
  async lost(code, reason, opened) {
    this.socket = null;
    this.current = null;
    let error;
    let refused = false;
    if (!opened && !this.closed) {
      error = await this.diagnose();
      refused = ["unauthorized", "origin_not_allowed"].includes(error.code);
    } else {
      error = new TTSStreamError(
        code === 1001 ? "going_away" : "connection_lost",
        code === 1001
          ? "the server is restarting; speak again in a moment"
          : `the connection was lost (${code}${reason ? ": " + reason : ""})`,
      );
    }
    this.failAll(error);
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason } }));
    if (!this.closed && !opened) this.dispatchEvent(new CustomEvent("error", { detail: error }));
    const abnormal = code !== 1000;
    if (this.closed || refused || !abnormal || this.options.reconnect === false) return;
    const delay = Math.min(
      this.options.maxBackoffMs ?? 30000,
      FIRST_BACKOFF_MS * 2 ** this.attempt++,
    );
    this.timer = setTimeout(() => this.connect(), delay * (0.5 + Math.random() / 2));
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
