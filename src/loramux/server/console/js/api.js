// Calls to the server's public API, with the API key in the Authorization header (never in a URL).
// The key lives in sessionStorage: this tab only, gone when it closes.
// `connection` tells the page what the calls learn: "reachable", "unreachable", "unauthorized".

const KEY = "loramux.apiKey";

export const connection = new EventTarget();

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: the server could not be reached
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

function tell(what) {
  connection.dispatchEvent(new Event(what));
}

async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: json !== undefined ? JSON.stringify(json) : form, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    tell("unreachable");
    throw new ApiError(0, "The server cannot be reached.");
  }
  tell("reachable");
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    if (response.status === 401) tell("unauthorized");
    throw new ApiError(response.status, body?.error?.message ?? `${response.status} ${response.statusText}`);
  }
  return response;
}

const getJSON = async (path) => (await request(path)).json();
const postJSON = async (path, json) => (await request(path, { method: "POST", json })).json();
const query = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v != null)).toString();

export const consoleConfig = () => getJSON("/console/config.json");
export const listModels = async () => (await getJSON("/v1/models")).data;
export const loadAdapter = (name, path, pinned) => postJSON("/v1/load_lora_adapter", { lora_name: name, lora_path: path, pinned });
export const unloadAdapter = (name) => postJSON("/v1/unload_lora_adapter", { lora_name: name });

export async function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return (await request("/v1/files", { method: "POST", form })).json();
}

export const listJobs = async (limit = 20) => (await getJSON(`/v1/fine_tuning/jobs?${query({ limit })}`)).data;
export const createJob = (body) => postJSON("/v1/fine_tuning/jobs", body);
// action: "cancel", "pause" or "resume"
export const jobAction = (id, action) => postJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/${action}`, {});
export const jobEvents = (id, after) => getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?${query({ limit: 100, after })}`);
export const jobCheckpoints = async (id) =>
  (await getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/checkpoints?${query({ limit: 100 })}`)).data;

export const serverStats = (window, interval) => getJSON(`/v1/loramux/stats?${query({ window, interval })}`);

// Streams a chat completion: yields the text of each delta; a failure inside the engine (an
// error event in the stream) is thrown as an ApiError.
export async function* streamChat(body, signal) {
  const response = await request("/v1/chat/completions", { method: "POST", json: { ...body, stream: true }, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) yield text;
    }
  }
}
