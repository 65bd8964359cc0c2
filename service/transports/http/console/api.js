// Calls to convserve's public HTTP API, as any client makes them: URLs relative to the page (so it
// works over http and https alike, and under a path prefix), the bearer token when one is set, and
// the server's own error message.

const TOKEN_KEY = "convserve-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const listeners = new Set();

/** The token lives in memory, and in sessionStorage only when the visitor asks (never localStorage). */
export function setToken(value, keep) {
  token = value;
  if (keep && value) {
    sessionStorage.setItem(TOKEN_KEY, value);
  } else {
    sessionStorage.removeItem(TOKEN_KEY);
  }
}

export function hasStoredToken() {
  return sessionStorage.getItem(TOKEN_KEY) !== null;
}

/** `listener({reachable, status, message})` after every call: the page's connection banner. */
export function onConnection(listener) {
  listeners.add(listener);
}

function report(state) {
  for (const listener of listeners) listener(state);
}

/** A refused or failed call: the HTTP status (0: no answer) and the server's message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Call `path` (with `query`, an object of values or arrays of values); `body` is sent as it is
 * (a Blob or bytes), or as JSON when `json` is given. Resolves to the Response; rejects with an
 * ApiError carrying the server's {"error": ...} message.
 */
export async function call(path, { method = "GET", query = {}, body, json } = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") params.append(name, String(item));
    }
  }
  const url = params.size ? `${path}?${params}` : path;
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (body && typeof body.type === "string" && body.type) {  // a file or blob: its own type
    headers["Content-Type"] = body.type;
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body, cache: "no-store" });
  } catch {
    const message = "The server cannot be reached; retrying.";
    report({ reachable: false, status: 0, message });
    throw new ApiError(0, message);
  }
  if (response.ok) {
    report({ reachable: true, status: response.status, message: "" });
    return response;
  }
  const message = await errorMessage(response);
  report({ reachable: true, status: response.status, message });
  throw new ApiError(response.status, message);
}

/** `call`, then the JSON answer. */
export async function callJson(path, options) {
  const response = await call(path, options);
  return response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

/** Show an error (or clear it with an empty message) in a view's alert paragraph. */
export function showError(element, error) {
  // the server's refusals (ApiError) carry their HTTP status; network failures do not
  const message = error ? (error.status ? `${error.status}: ${error.message}` : error.message) : "";
  element.textContent = message;
  element.hidden = !message;
}
