// The fine-tuning panel: jobs with status, progress and ETA (from their events), the selected
// job's train and eval loss by step, its checkpoints (each a model of its own), pause, resume,
// cancel, and a new job from an uploaded JSONL file with its hyperparameters.

import { createJob, jobAction, jobCheckpoints, jobEvents, listJobs, uploadFile } from "./api.js";
import { COLORS, lineChart } from "./charts.js";
import { duration, h, keepFocus, number, say } from "./dom.js";
import { poll } from "./poll.js";
import { models } from "./state.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

// A job's events, oldest first, fetched page by page (the API lists them newest first) until
// one already known.
class EventLog {
  constructor(jobId) {
    this.jobId = jobId;
    this.ids = new Set();
    this.list = [];
  }

  async update() {
    const fresh = [];
    let after;
    for (;;) {
      const page = await jobEvents(this.jobId, after);
      const known = page.data.findIndex((e) => this.ids.has(e.id));
      fresh.push(...(known === -1 ? page.data : page.data.slice(0, known)));
      if (known !== -1 || !page.has_more || page.data.length === 0) break;
      after = page.data.at(-1).id;
    }
    for (const event of fresh.reverse()) {
      this.ids.add(event.id);
      this.list.push(event);
    }
  }

  latest(field) {
    return this.list.findLast((e) => e.data?.[field] != null);
  }

  // [steps, train losses, eval losses] for the chart: one column per step, the latest value of each
  // (a resumed job repeats steps), nulls where a step has only one of the two.
  losses() {
    const byStep = new Map();
    for (const { data } of this.list) {
      if (data?.step == null || (data.train_loss == null && data.eval_loss == null)) continue;
      const point = byStep.get(data.step) ?? { train: null, eval: null };
      if (data.train_loss != null) point.train = data.train_loss;
      if (data.eval_loss != null) point.eval = data.eval_loss;
      byStep.set(data.step, point);
    }
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    return [steps, steps.map((s) => byStep.get(s).train), steps.map((s) => byStep.get(s).eval)];
  }
}

function progress(job, log) {
  const latest = log?.latest("total_steps");
  if (job.status === "succeeded") return { share: 1, text: "done" };
  if (!latest) return { share: null, text: "—" };
  const { step, total_steps: total } = latest.data;
  return { share: step / total, text: `${step} / ${total}` };
}

function eta(job, log) {
  const latest = log?.latest("eta_seconds");
  if (FINAL.has(job.status) || !latest) return "—";
  return duration(latest.data.eta_seconds - (Date.now() / 1000 - latest.created_at));
}

const optionalNumber = (value) => (value === "" || value == null ? undefined : Number(value));

export function jobsPanel(active, onModelsChanged) {
  const body = document.querySelector("#jobs-table tbody");
  const detail = document.getElementById("job-detail");
  const actions = { cancel: document.getElementById("job-cancel"), pause: document.getElementById("job-pause"),
    resume: document.getElementById("job-resume") };
  const jobMessage = document.getElementById("job-message");
  const checkpointsBody = document.querySelector("#checkpoints-table tbody");
  const form = document.getElementById("job-form");
  const formMessage = form.querySelector(".form-message");
  const logs = new Map();
  let jobs = [];
  let selected = null;
  let chart = null;

  const logOf = (id) => logs.get(id) ?? logs.set(id, new EventLog(id)).get(id);

  function renderList() {
    if (jobs.length === 0) {
      body.replaceChildren(h("tr", {}, h("td", { colSpan: 5, className: "hint" }, "No jobs yet: start one below.")));
      return;
    }
    keepFocus(body, () => body.replaceChildren(...jobs.map((job) => {
      const log = logs.get(job.id);
      const { share, text } = progress(job, log);
      const bar = h("progress", { max: 1, value: share ?? 0 });
      bar.setAttribute("aria-label", `progress of ${job.id}`);
      if (share == null) bar.removeAttribute("value");
      return h("tr", { "data-job-id": job.id, className: job.id === selected ? "selected" : "" },
        h("td", {}, h("button", { type: "button", className: "link", "data-key": `job:${job.id}`, onclick: () => select(job.id) },
          job.id.slice(-12))),
        h("td", { "data-label": "Status" }, h("span", { className: `badge ${job.status}` }, job.status.replaceAll("_", " "))),
        h("td", { className: "progress", "data-label": "Progress" }, bar, " ", text),
        h("td", { "data-label": "ETA" }, eta(job, log)),
        h("td", { className: "name", "data-label": "Model" }, job.fine_tuned_model ?? job.adapter_name ?? "—"));
    })));
  }

  function renderDetail() {
    const job = jobs.find((j) => j.id === selected);
    detail.hidden = !job;
    if (!job) return;
    const { hyperparameters: hp, lora } = job;
    document.getElementById("job-title").textContent = `Job ${job.id}`;
    document.getElementById("job-summary").textContent = [
      `adapter ${job.fine_tuned_model ?? job.adapter_name}`, job.status.replaceAll("_", " "),
      `${job.trained_tokens ?? 0} tokens trained`,
      `${hp.n_epochs} epochs, batch ${hp.batch_size}, learning rate ×${hp.learning_rate_multiplier}`,
      job.method?.type === "dpo" ? `DPO, beta ${job.method.dpo.hyperparameters.beta}` : null,
      job.init_from ? `started from ${job.init_from}` : null,
      lora ? `LoRA r ${lora.r}, alpha ${lora.alpha}, ${[lora.target_modules].flat().join(", ")}` : null,
      job.error ? `error: ${job.error.message}` : null,
    ].filter(Boolean).join(" · ");
    actions.cancel.hidden = FINAL.has(job.status);
    actions.pause.hidden = !["running", "queued", "validating_files"].includes(job.status);
    actions.resume.hidden = job.status !== "paused";
    chart ??= lineChart(document.getElementById("loss-chart"), {
      time: false, xLabel: "step",
      series: [{ label: "train loss", stroke: COLORS.train }, { label: "eval loss", stroke: COLORS.eval }],
    });
    chart.update(logOf(job.id).losses());
  }

  function renderCheckpoints(job, checkpoints) {
    if (checkpoints.length === 0) {
      checkpointsBody.replaceChildren(h("tr", {}, h("td", { colSpan: 4, className: "hint" }, "No checkpoint yet.")));
      return;
    }
    keepFocus(checkpointsBody, () => checkpointsBody.replaceChildren(...checkpoints.map((c) => {
      // a checkpoint is a model of its own, loaded on demand by the requests that name it
      const button = h("span", { className: "hint" }, `served as ${c.fine_tuned_model_checkpoint}`);
      return h("tr", {}, h("td", { "data-label": "Step" }, String(c.step_number)),
        h("td", { "data-label": "Train loss" }, number(c.metrics?.train_loss, 4)),
        h("td", { "data-label": "Eval loss" }, number(c.metrics?.valid_loss, 4)), h("td", {}, button));
    })));
  }

  const refresh = poll(async () => {
    jobs = await listJobs();
    const watched = jobs.filter((j) => !FINAL.has(j.status) || j.id === selected);
    await Promise.all(watched.map((j) => logOf(j.id).update()));
    renderList();
    renderDetail();
    const job = jobs.find((j) => j.id === selected);
    if (job) renderCheckpoints(job, await jobCheckpoints(job.id));
  }, 2000, active);

  function select(id) {
    selected = id;
    say(jobMessage, "");
    refresh.now();
  }

  const done = { cancel: "Cancelled.", pause: "Paused.", resume: "Resumed." };
  for (const [action, button] of Object.entries(actions)) {
    button.addEventListener("click", async () => {
      try {
        await jobAction(selected, action);
        say(jobMessage, done[action], "ok");
      } catch (error) {
        say(jobMessage, `Could not ${action}: ${error.message}`);
      }
      refresh.now();
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    const targets = data.target_modules.trim();
    try {
      say(formMessage, "Uploading…", "info");
      const training = await uploadFile(data.training_file);
      const validation = data.validation_file?.size ? await uploadFile(data.validation_file) : null;
      say(formMessage, "Starting…", "info");
      const job = await createJob({
        model: models.base,
        training_file: training.id,
        validation_file: validation?.id,
        suffix: data.suffix.trim() || undefined,
        hyperparameters: {
          n_epochs: optionalNumber(data.n_epochs), batch_size: optionalNumber(data.batch_size),
          learning_rate_multiplier: optionalNumber(data.learning_rate_multiplier),
        },
        lora: {
          r: Number(data.r), alpha: Number(data.alpha),
          target_modules: targets === "all-linear" ? targets : targets.split(",").map((t) => t.trim()).filter(Boolean),
        },
        training: {
          max_steps: optionalNumber(data.max_steps), eval_every: optionalNumber(data.eval_every),
          checkpoint_every: optionalNumber(data.checkpoint_every),
        },
      });
      say(formMessage, "");
      form.reset();
      form.closest("details").open = false;
      select(job.id);
      say(jobMessage, `Started ${job.id}.`, "ok");
      onModelsChanged();
    } catch (error) {
      say(formMessage, `Could not start the job: ${error.message}`);
    }
  });
}
