// The console's start: reach the server, get the API key if it needs one (asked once per tab,
// asked again if the server refuses it), then start the panels, which poll only while authorized.

import { ApiError, apiKey, connection, consoleConfig, listModels } from "./api.js";
import { say } from "./dom.js";
import { jobsPanel } from "./jobs.js";
import { modelsPanel } from "./models.js";
import { playgroundPanel } from "./playground.js";
import { servingPanel } from "./serving.js";
import { models } from "./state.js";

const dialog = document.getElementById("auth-dialog");
const authForm = document.getElementById("auth-form");
const authMessage = document.getElementById("auth-message");
const banner = document.getElementById("unreachable");
const status = document.getElementById("connection");
const forget = document.getElementById("forget-key");
let authorized = false;
let refreshModels = null;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

connection.addEventListener("unreachable", () => {
  banner.textContent = `Cannot reach the loramux server at ${location.origin}. Is it running? Retrying…`;
  banner.hidden = false;
  status.textContent = "Disconnected";
});
const showConnected = () => {
  if (models.base) status.textContent = `Connected · base model ${models.base}`;
};

connection.addEventListener("reachable", () => {
  banner.hidden = true;
  showConnected();
});
connection.addEventListener("unauthorized", () => {
  if (dialog.open) return; // the dialog's own check says what went wrong
  askForKey("The server refused the API key; enter it again.");
});
models.events.addEventListener("change", showConnected);

function askForKey(message = "") {
  authorized = false;
  apiKey.clear();
  say(authMessage, message);
  if (!dialog.open) dialog.showModal();
  authForm.elements.key.focus();
}

dialog.addEventListener("cancel", (event) => event.preventDefault()); // nothing works without the key
authForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey.set(authForm.elements.key.value);
  say(authMessage, "Checking…", "info");
  try {
    await listModels();
  } catch (error) {
    apiKey.clear();
    const wrong = error instanceof ApiError && error.status === 401;
    say(authMessage, wrong ? "Wrong API key: the server refused it." : error.message);
    authForm.elements.key.select();
    return;
  }
  authForm.reset();
  dialog.close();
  start();
});

forget.addEventListener("click", () => askForKey());

// Starts the panels once; after a key was asked for again, refreshes the models at once (the
// other panels' polls resume on their own).
function start() {
  authorized = true;
  if (refreshModels) {
    refreshModels.now();
    return;
  }
  const active = () => authorized;
  refreshModels = modelsPanel(active);
  jobsPanel(active, () => refreshModels.now());
  servingPanel(active);
  playgroundPanel();
}

async function boot() {
  let config;
  while (!config) {
    try {
      config = await consoleConfig();
    } catch {
      await sleep(3000);
    }
  }
  forget.hidden = !config.api_key_required;
  if (!config.api_key_required) start();
  else if (!apiKey.get()) askForKey();
  else {
    try {
      await listModels(); // a key kept from earlier in this tab: still the right one?
      start();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) start();
    }
  }
}

boot();
