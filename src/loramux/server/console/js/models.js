// The models panel: the base model and every adapter from GET /v1/models (resident or on disk,
// and whatever else the cards say), unloading adapters, loading one from a server directory.

import { loadAdapter, listModels, unloadAdapter } from "./api.js";
import { h, keepFocus, say } from "./dom.js";
import { poll } from "./poll.js";
import { models } from "./state.js";

const SHOWN = new Set(["id", "object", "created", "owned_by", "parent", "resident", "root", "max_model_len", "pinned",
  "lora", "size_bytes"]);

function details(card) {
  const parts = [];
  if (card.max_model_len) parts.push(`context ${card.max_model_len} tokens`);
  if (card.pinned) parts.push("pinned");
  if (card.lora) parts.push(`rank ${card.lora.r}, alpha ${card.lora.alpha}, ${(card.lora.target_modules ?? []).join(", ")}`);
  if (card.size_bytes != null) parts.push(`${(card.size_bytes / 2 ** 20).toFixed(1)} MiB`);
  if (card.root) parts.push(card.root);
  for (const [name, value] of Object.entries(card)) {
    if (!SHOWN.has(name) && value != null) parts.push(`${name.replaceAll("_", " ")}: ${typeof value === "object" ? JSON.stringify(value) : value}`);
  }
  return parts.join(" · ");
}

export function modelsPanel(active) {
  const body = document.querySelector("#models-table tbody");
  const form = document.getElementById("load-form");
  const message = form.querySelector(".form-message");

  function render(list) {
    keepFocus(body, () => body.replaceChildren(...list.map((card) => {
      const adapter = card.parent != null;
      const unload = adapter
        ? h("button", { type: "button", className: "quiet", "data-key": `unload:${card.id}`, onclick: () => remove(card.id) }, "Unload")
        : null;
      if (unload) unload.setAttribute("aria-label", `Unload ${card.id}`);
      return h("tr", { "data-model-id": card.id },
        h("td", { className: "name" }, card.id),
        h("td", { "data-label": "Kind" }, adapter ? "adapter" : "base model"),
        h("td", { "data-label": "Resident" }, h("span", { className: `badge ${card.resident ? "ok" : "idle"}` }, card.resident ? "resident" : "on disk")),
        h("td", { className: "details" }, details(card)),
        h("td", {}, unload));
    })));
  }

  const refresh = poll(async () => {
    const list = await listModels();
    models.set(list);
    render(list);
  }, 10000, active);

  async function remove(name) {
    try {
      await unloadAdapter(name);
      say(message, `Unloaded ${name}.`, "ok");
    } catch (error) {
      say(message, `Could not unload ${name}: ${error.message}`);
    }
    refresh.now();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    say(message, "Loading…", "info");
    try {
      await loadAdapter(data.get("lora_name").trim(), data.get("lora_path").trim(), data.get("pinned") === "on");
      say(message, `Loaded ${data.get("lora_name")}.`, "ok");
      form.reset();
    } catch (error) {
      say(message, `Could not load the adapter: ${error.message}`);
    }
    refresh.now();
  });
  return refresh;
}
