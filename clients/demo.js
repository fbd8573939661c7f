// @ts-check
/** The demo page: a text box, voices, prosody, and the spoken word highlighted. */
import { TTSStreamClient, sliceCodePoints } from "/clients/ttsstream.js";

/** @param {string} id */
const $ = (id) => /** @type {any} */ (document.getElementById(id));
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`;

/**
 * State the tests read: the client, the utterance playing, the words highlighted, and
 * where playback was at each resume of a dropped connection (seconds).
 */
const demo = {
  /** @type {TTSStreamClient | null} */ client: null,
  /** @type {import("/clients/ttsstream.js").Utterance | null} */ utterance: null,
  /** @type {number[]} */ wordLog: [],
  /** @type {Array<number | null>} */ resumedAt: [],
};
/** @type {any} */ (window).demo = demo;

/** A client for the API key in the form; a new one when the key changes. */
function client() {
  const key = $("key").value.trim();
  if (!demo.client || demo.client.options.apiKey !== (key || undefined)) {
    if (demo.client) demo.client.close();
    demo.client = new TTSStreamClient(wsUrl, { apiKey: key || undefined });
    demo.client.addEventListener("error", (event) => showError(/** @type {any} */ (event).detail));
    // A dropped connection comes back by itself: say so, and where playback went on.
    demo.client.addEventListener("reconnecting", () => {
      $("connection").textContent = "connection lost, reconnecting…";
    });
    demo.client.addEventListener("resumed", (event) => {
      const { position } = /** @type {any} */ (event).detail;
      demo.resumedAt.push(position);
      const where = position === null ? "" : ` at ${position.toFixed(1)} s`;
      $("connection").textContent = `reconnected, resumed${where}`;
    });
  }
  return demo.client;
}

/** @param {Error} error */
function showError(error) {
  $("error").textContent = error.message;
}

async function loadVoices() {
  let voices;
  try {
    voices = await client().voices();
  } catch (error) {
    showError(/** @type {Error} */ (error));
    return;
  }
  const select = $("voice");
  const byLocale = new Map();
  for (const voice of voices) {
    if (!byLocale.has(voice.locale)) byLocale.set(voice.locale, []);
    byLocale.get(voice.locale).push(voice);
  }
  for (const locale of [...byLocale.keys()].sort()) {
    const group = document.createElement("optgroup");
    group.label = locale;
    for (const voice of byLocale.get(locale)) {
      const option = document.createElement("option");
      option.value = voice.name;
      option.textContent = voice.engine === "espeak" ? `${voice.name} (offline)` : voice.name;
      group.append(option);
    }
    select.append(group);
  }
  const hello = demo.client?.hello;
  if (hello) {
    select.options[0].textContent = `Default voice (${hello.default_voice})`;
  }
}

/**
 * Show the text with each known word wrapped in a span, the current one highlighted.
 * @param {string} text
 * @param {import("/clients/ttsstream.js").WordMessage[]} words
 * @param {number} current
 */
function render(text, words, current) {
  const spoken = $("spoken");
  spoken.replaceChildren();
  const chars = Array.from(text);
  let cursor = 0;
  words.forEach((word, index) => {
    if (word.char_start === null || word.char_end === null || word.char_start < cursor) return;
    spoken.append(chars.slice(cursor, word.char_start).join(""));
    const span = document.createElement("span");
    span.className = index === current ? "word current" : "word";
    span.dataset.index = String(index);
    span.textContent = sliceCodePoints(text, word.char_start, word.char_end);
    spoken.append(span);
    cursor = word.char_end;
  });
  spoken.append(chars.slice(cursor).join(""));
}

/** @param {string} sign @param {string} value @param {string} unit */
const signed = (sign, value, unit) => `${Number(value) >= 0 ? sign : ""}${value}${unit}`;

function speak() {
  if (demo.utterance) demo.utterance.cancel();
  $("error").textContent = "";
  $("figures").textContent = "";
  $("connection").textContent = "";
  const text = $("text").value;
  const utterance = client().speak(text, {
    voice: $("voice").value || undefined,
    rate: signed("+", $("rate").value, "%"),
    pitch: signed("+", $("pitch").value, "Hz"),
    volume: signed("+", $("volume").value, "%"),
  });
  demo.utterance = utterance;
  demo.wordLog = [];
  const asked = performance.now();
  utterance.audio?.addEventListener(
    "playing",
    () => {
      const heard = `heard after ${(performance.now() - asked).toFixed(0)} ms`;
      $("figures").textContent = [$("figures").textContent, heard].filter(Boolean).join(" · ");
    },
    { once: true },
  );
  render(text, [], -1);
  $("stop").disabled = false;
  utterance.addEventListener("start", (event) => {
    const start = /** @type {any} */ (event).detail;
    const engine = start.fallback ? `${start.engine}, fallback: ${start.fallback_reason}` : start.engine;
    $("figures").textContent = `${start.cached ? "cached" : "live"} · ${engine} · ${start.voice}`;
  });
  utterance.addEventListener("wordchange", (event) => {
    const word = /** @type {any} */ (event).detail;
    const index = word ? utterance.words.indexOf(word) : -1;
    if (index >= 0) demo.wordLog.push(index);
    render(text, utterance.words, index);
  });
  utterance.addEventListener("end", (event) => {
    const end = /** @type {any} */ (event).detail;
    $("figures").textContent +=
      ` · first audio ${end.ttfb_ms.toFixed(0)} ms · ${(end.audio_ms / 1000).toFixed(1)} s of audio`;
  });
  utterance.done
    .catch((error) => {
      if (error.code !== "cancelled") showError(error);
    })
    .finally(() => {
      if (utterance.audio) utterance.audio.addEventListener("ended", () => ($("stop").disabled = true));
    });
}

for (const [name, unit] of [["rate", "%"], ["pitch", "Hz"], ["volume", "%"]]) {
  $(name).addEventListener("input", () => {
    $(`${name}-value`).textContent = signed("+", $(name).value, unit);
  });
}
$("form").addEventListener("submit", (/** @type {Event} */ event) => {
  event.preventDefault();
  speak();
});
$("stop").addEventListener("click", () => {
  if (demo.utterance) demo.utterance.cancel();
  $("stop").disabled = true;
});
$("key").addEventListener("change", () => loadVoices());
loadVoices();
