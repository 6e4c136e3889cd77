// Server-sent events over fetch (EventSource can only GET, and cannot send the API key's header): POST
// a body, read `data:` lines as JSON. Every call goes through apiFetch (auth.js), which adds the key.

import { apiFetch } from "./auth.js";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// POST `body` as JSON to `path` and return the response; a non-2xx status throws an ApiError
// carrying the server's OpenAI-shaped error message.
export async function postJSON(path, body, signal) {
  const response = await apiFetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

export async function getJSON(path, signal) {
  const response = await apiFetch(path, { signal, cache: "no-store" });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message ?? JSON.stringify(body);
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Yields each event's `data` parsed as JSON; returns at `data: [DONE]`, and returns `false` when the
// body ended without it (the connection was cut), `true` after [DONE].
export async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const data = dataOf(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") return true;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function dataOf(event) {
  return event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n");
}
