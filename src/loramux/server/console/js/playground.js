// The playground: a streamed chat with up to three models side by side (the base model, adapters,
// a job's model or a checkpoint served as an adapter), each keeping its own conversation.

import { streamChat } from "./api.js";
import { h } from "./dom.js";
import { models } from "./state.js";

export function playgroundPanel() {
  const form = document.getElementById("chat-form");
  const selects = [0, 1, 2].map((i) => form.elements[`model${i}`]);
  const stop = document.getElementById("chat-stop");
  const transcripts = document.getElementById("transcripts");
  const conversations = new Map(); // model id -> {messages, element}
  let controller = null;

  models.events.addEventListener("change", () => {
    const ids = models.list.map((m) => m.id);
    const adapters = models.list.filter((m) => m.parent != null).map((m) => m.id);
    const defaults = [models.base, adapters[0] ?? "", ""];
    selects.forEach((select, i) => {
      const current = select.dataset.filled ? select.value : defaults[i];
      const options = i === 0 ? [] : [h("option", { value: "" }, "— none —")];
      select.replaceChildren(...options, ...ids.map((id) => h("option", { value: id }, id)));
      select.value = ids.includes(current) ? current : (i === 0 ? models.base : "");
      select.dataset.filled = "yes";
    });
  });

  function column(model) {
    if (!conversations.has(model)) {
      const log = h("ol", { className: "messages", "aria-live": "polite" });
      const element = h("section", { className: "transcript", "data-model": model }, h("h3", {}, model), log);
      conversations.set(model, { messages: [], element, log });
    }
    return conversations.get(model);
  }

  async function ask(model, text, settings, signal) {
    const conversation = column(model);
    conversation.messages.push({ role: "user", content: text });
    conversation.log.append(h("li", { className: "user" }, text));
    const answer = h("li", { className: "assistant", "aria-busy": "true" });
    conversation.log.append(answer);
    let reply = "";
    try {
      for await (const piece of streamChat({ model, messages: conversation.messages, ...settings }, signal)) {
        reply += piece;
        answer.textContent = reply;
      }
    } catch (error) {
      answer.append(h("span", { className: "error" }, error.name === "AbortError" ? " [stopped]" : ` [error: ${error.message}]`));
    } finally {
      answer.setAttribute("aria-busy", "false");
      answer.dataset.done = "yes";
    }
    conversation.messages.push({ role: "assistant", content: reply });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = [...new Set(selects.map((s) => s.value).filter(Boolean))];
    const text = form.elements.message.value.trim();
    if (!text || chosen.length === 0) return;
    const settings = { max_tokens: Number(form.elements.max_tokens.value), temperature: Number(form.elements.temperature.value) };
    transcripts.replaceChildren(...chosen.map((model) => column(model).element));
    form.elements.message.value = "";
    controller = new AbortController();
    stop.disabled = false;
    await Promise.all(chosen.map((model) => ask(model, text, settings, controller.signal)));
    stop.disabled = true;
  });

  stop.addEventListener("click", () => controller?.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    conversations.clear();
    transcripts.replaceChildren();
  });
}
