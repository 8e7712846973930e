// lorafleet's tenant page: log in with a tenant token, see the tenant's jobs, follow one job's loss curve and events
// live, download its result files and checkpoints, try its model on a prompt. It only calls the gateway's JSON API
// (../v1/ from this page).
//
// Safety rules kept throughout: the token lives in sessionStorage and travels only in the Authorization header; every
// value from the API enters the page as a text node or an attribute value (el/svg below), never as HTML; links the
// page makes are its own hash routes (ids URL-encoded) or blob: URLs of downloaded contents.
"use strict";

const TOKEN_KEY = "lorafleet.token";
const POLL_MS = 1500;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = new Set(["validating_files", "queued", "running", "paused", ...FINISHED]);
const API = new URL("../v1/", document.baseURI);
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = {width: 720, height: 280, left: 56, right: 16, top: 16, bottom: 40};

let view = 0; // bumped on every navigation: the pollers of an older view stop

// ---- building nodes from data (text only) ----

function $(id) { return document.getElementById(id); }

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function el(tag, attrs = {}, ...children) { return fill(document.createElement(tag), attrs, children); }

function svg(tag, attrs = {}, ...children) { return fill(document.createElementNS(SVG_NS, tag), attrs, children); }

function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : "—"; }

function jobLink(id) { return el("a", {href: "#/jobs/" + encodeURIComponent(id)}, id); }

function statusBadge(status) {
  return el("span", {class: "status", "data-status": STATUSES.has(status) ? status : "unknown"}, status);
}

function progressOf(job) {
  const step = job.lorafleet?.step ?? 0, total = job.lorafleet?.total_steps ?? 0;
  return el("span", {class: "progress"}, el("progress", {max: Math.max(total, 1), value: Math.min(step, total)}),
            ` ${step}/${total}`);
}

function metadataText(job) {
  return Object.entries(job.metadata || {}).map(([key, value]) => `${key}=${value}`).join(", ");
}

// ---- the API ----

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body = undefined) {
  const headers = {Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}`};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(path, API), {
    method: body === undefined ? "GET" : "POST", headers, credentials: "omit", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not OpenAI's error shape */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function apiJson(path) { return (await api(path)).json(); }

function jobPath(id, tail = "") { return `fine_tuning/jobs/${encodeURIComponent(id)}${tail}`; }

// ---- errors, views, polling ----

function showError(message) { $("error").textContent = message; $("error").hidden = false; }

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

function fail(error) {
  if (error instanceof ApiError && error.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    show("login-view");
    showError(`Your token was refused: ${error.message}`);
  } else {
    showError(error instanceof ApiError ? error.message : `The server could not be reached: ${error.message}`);
  }
}

function show(id) {
  view += 1;
  for (const section of ["login-view", "jobs-view", "job-view"]) $(section).hidden = section !== id;
  $("logout").hidden = id === "login-view";
}

// Run `work` now and again every POLL_MS while it answers true and its view is shown. A refusal (4xx) stops it; a
// network error or a 5xx is shown and retried.
function poll(work) {
  const mine = view;
  const tick = async () => {
    if (mine !== view) return;
    let again;
    try {
      again = await work();
      if (mine === view) clearError();
    } catch (error) {
      if (mine !== view) return;
      fail(error);
      again = !(error instanceof ApiError && error.status < 500);
    }
    if (again && mine === view) setTimeout(tick, POLL_MS);
  };
  tick();
}

function route() {
  clearError();
  if (!sessionStorage.getItem(TOKEN_KEY)) { show("login-view"); return; }
  const match = location.hash.match(/^#\/jobs\/([^/]+)$/);
  if (match) openJob(decodeURIComponent(match[1])); else openJobs();
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await apiJson("fine_tuning/jobs?limit=1");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    fail(error);
    return;
  }
  route();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  history.replaceState(null, "", "#/");
  route();
}

// ---- the job list ----

function openJobs() {
  show("jobs-view");
  poll(async () => {
    const page = await apiJson("fine_tuning/jobs?limit=100");
    $("jobs").tBodies[0].replaceChildren(...page.data.map(job => el("tr", {},
      el("td", {}, jobLink(job.id)),
      el("td", {}, job.suffix, el("div", {class: "metadata"}, metadataText(job))),
      el("td", {}, statusBadge(job.status)),
      el("td", {class: "model"}, job.model),
      el("td", {}, when(job.created_at)),
      el("td", {}, progressOf(job)))));
    $("no-jobs").hidden = page.data.length > 0;
    return true;
  });
}

// ---- one job ----

function openJob(id) {
  show("job-view");
  $("job-title").textContent = id;
  for (const part of ["job-details", "chart", "samples", "downloads", "events", "try-model", "try-output"]) {
    $(part).replaceChildren();
  }
  $("try-part").hidden = true;
  const seen = {events: [], after: null, status: null};
  poll(async () => {
    const job = await apiJson(jobPath(id));  // before the events: once finished, the events read next are all
    const fresh = await newEvents(id, seen);
    showJob(job);
    $("samples-part").hidden = !(job.lorafleet?.eval_samples?.length || $("samples").childElementCount);
    if (fresh.length || seen.status === null) {
      for (const event of fresh) $("events").prepend(eventItem(event));
      for (const event of fresh.filter(event => event.data?.kind === "eval_samples")) {
        $("samples").prepend(samplesItem(event));
      }
      $("chart").replaceChildren(lossChart(seen.events, job.lorafleet?.total_steps ?? 0));
    }
    if (seen.status !== job.status || fresh.some(event => event.data?.kind === "checkpoint")) {
      await showDownloads(job);
    }
    seen.status = job.status;
    return !FINISHED.has(job.status);
  });
}

async function newEvents(id, seen) {
  const fresh = [];
  for (;;) {
    const query = seen.after ? `?limit=100&after=${encodeURIComponent(seen.after)}` : "?limit=100";
    const page = await apiJson(jobPath(id, "/events" + query));
    fresh.push(...page.data);
    if (page.data.length) seen.after = page.data[page.data.length - 1].id;
    if (!page.has_more) break;
  }
  seen.events.push(...fresh);
  return fresh;
}

function showJob(job) {
  $("job-title").replaceChildren(job.suffix ? `${job.suffix} ` : "", el("small", {}, job.id));
  const hp = job.hyperparameters || {};
  const rows = [
    ["Status", statusBadge(job.status)], ["Model", job.model], ["Fine-tuned model", job.fine_tuned_model || "—"],
    ["Created", when(job.created_at)], ["Finished", when(job.finished_at)], ["Progress", progressOf(job)],
    ["Estimated finish", when(job.estimated_finish)],
    ["Hyperparameters", `epochs ${hp.n_epochs}, batch ${hp.batch_size}, lr × ${hp.learning_rate_multiplier}`],
    ["Training file", job.training_file], ["Validation file", job.validation_file || "—"],
    ["Metadata", metadataText(job) || "—"],
  ];
  if (job.error) rows.push(["Error", el("span", {class: "error-text"}, job.error.message)]);
  $("job-details").replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

function eventItem(event) {
  const level = ["info", "warn", "error"].includes(event.level) ? event.level : "info";
  return el("li", {"data-level": level}, el("time", {}, when(event.created_at)), " ", event.message);
}

// ---- samples: one block per checkpoint, each prompt and what the adapter completed it with ----

function samplesItem(event) {
  const data = event.data || {};
  const heading = el("h3", {}, `Step ${data.step}`, " ", el("time", {}, when(event.created_at)));
  if (data.error) {
    return el("section", {class: "sample-set", "data-step": data.step}, heading,
              el("p", {class: "error-text"}, `No samples: ${data.error}`));
  }
  const items = (data.samples || []).map(sample => el("li", {},
    el("div", {class: "prompt"}, sample.prompt),
    el("div", {class: "completion", "data-finish": sample.finish_reason === "length" ? "length" : "stop"},
       sample.completion)));
  return el("section", {class: "sample-set", "data-step": data.step}, heading, el("ol", {}, ...items));
}

// ---- downloads: the API wants the bearer header, so contents are fetched and handed over as a blob: URL ----

async function showDownloads(job) {
  const items = (job.result_files || []).map(fileId => el("li", {}, "Result file ", downloadButton(fileId)));
  const checkpoints = await apiJson(jobPath(job.id, "/checkpoints?limit=100"));
  for (const checkpoint of checkpoints.data) {
    const loss = checkpoint.metrics?.train_loss;
    items.push(el("li", {}, `Checkpoint at step ${checkpoint.step_number}`,
                  Number.isFinite(loss) ? ` (train loss ${loss.toFixed(4)}) ` : " ",
                  checkpoint.file_id ? downloadButton(checkpoint.file_id) : el("span", {class: "note"}, "no file")));
  }
  if (!items.length) items.push(el("li", {class: "note"}, "Nothing to download yet."));
  $("downloads").replaceChildren(...items);
  showModels([job.fine_tuned_model, ...checkpoints.data.map(checkpoint => checkpoint.fine_tuned_model_checkpoint)]);
}

function downloadButton(fileId) {
  const button = el("button", {type: "button", class: "download"}, `Download ${fileId}`);
  button.addEventListener("click", () => download(fileId, button));
  return button;
}

async function download(fileId, button) {
  button.disabled = true;
  try {
    const path = `files/${encodeURIComponent(fileId)}`;
    const name = (await apiJson(path)).filename || fileId;
    const url = URL.createObjectURL(await (await api(path + "/content")).blob());
    const link = el("a", {href: url, download: name.split("/").pop()});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    fail(error);
  } finally {
    button.disabled = false;
  }
}

// ---- try it: a streamed completion (server-sent events read off the fetch body), shown as text as it comes ----

function showModels(names) {
  const models = names.filter(Boolean), chosen = $("try-model").value;
  $("try-model").replaceChildren(...models.map(name => el("option", {value: name}, name)));
  if (models.includes(chosen)) $("try-model").value = chosen;
  $("try-part").hidden = models.length === 0;
}

async function tryModel(event) {
  event.preventDefault();
  const button = $("try-form").querySelector("button"), output = $("try-output");
  const text = el("span", {class: "completion"}), status = el("span", {class: "note"}, " generating…");
  output.replaceChildren(text, status);
  button.disabled = true;
  try {
    const response = await api("completions", {
      model: $("try-model").value, prompt: $("try-prompt").value, max_tokens: Number($("try-max-tokens").value),
      temperature: 0, stream: true});
    const finish = await readStream(response, chunk => text.append(chunk.choices?.[0]?.text ?? ""));
    status.textContent = ` (${finish === "length" ? "stopped at max tokens" : "finished"})`;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) { fail(error); return; }
    status.replaceChildren(el("span", {class: "error-text"}, ` ${error.message}`));
  } finally {
    button.disabled = false;
  }
}

// Calls `onChunk` with each `data:` event's JSON until `[DONE]`; the last finish_reason. An `error` event throws.
async function readStream(response, onChunk) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "", finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return finish;
    buffered += value;
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter(line => line.startsWith("data: ")).map(line => line.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message || "the generation failed");
      finish = chunk.choices?.[0]?.finish_reason ?? finish;
      onChunk(chunk);
    }
  }
}

// ---- the loss chart: inline SVG, one polyline and one circle per point for each series ----

// Step -> value of a progress metric; a later event for a step (after a resume from a checkpoint) replaces the earlier.
function series(events, metric) {
  const byStep = new Map();
  for (const event of events) {
    const data = event.data || {};
    if (data.kind === "progress" && Number.isFinite(data.step) && Number.isFinite(data[metric])) {
      byStep.set(data.step, data[metric]);
    }
  }
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]);
}

function lossChart(events, totalSteps) {
  const lines = [{name: "train loss", kind: "train", points: series(events, "loss")},
                 {name: "validation loss", kind: "valid", points: series(events, "eval_loss")}];
  const all = lines.flatMap(line => line.points);
  const chart = svg("svg", {viewBox: `0 0 ${CHART.width} ${CHART.height}`, class: "loss-chart", role: "img",
                            "aria-label": "loss by step"});
  if (!all.length) {
    chart.append(svg("text", {x: CHART.width / 2, y: CHART.height / 2, "text-anchor": "middle", class: "empty"},
                     "No loss reported yet"));
    return chart;
  }
  const xMax = Math.max(totalSteps, ...all.map(([step]) => step), 1);
  let yMin = Math.min(...all.map(([, y]) => y)), yMax = Math.max(...all.map(([, y]) => y));
  const pad = (yMax - yMin) * 0.05 || Math.abs(yMax) * 0.05 || 1;
  yMin -= pad;
  yMax += pad;
  const x = step => CHART.left + (step / xMax) * (CHART.width - CHART.left - CHART.right);
  const y = value => CHART.top + (1 - (value - yMin) / (yMax - yMin)) * (CHART.height - CHART.top - CHART.bottom);
  chart.append(...axes(x, y, xMax, yMin, yMax));
  for (const line of lines.filter(line => line.points.length)) {
    chart.append(svg("polyline", {class: `line ${line.kind}`,
                                  points: line.points.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}));
    for (const [step, value] of line.points) {
      chart.append(svg("circle", {class: `point ${line.kind}`, cx: x(step).toFixed(1), cy: y(value).toFixed(1), r: 3},
                       svg("title", {}, `step ${step}: ${line.name} ${value.toFixed(4)}`)));
    }
  }
  chart.append(...legend(lines.filter(line => line.points.length)));
  return chart;
}

function axes(x, y, xMax, yMin, yMax) {
  const bottom = CHART.height - CHART.bottom, nodes = [];
  nodes.push(svg("line", {class: "axis", x1: CHART.left, y1: bottom, x2: CHART.width - CHART.right, y2: bottom}));
  nodes.push(svg("line", {class: "axis", x1: CHART.left, y1: CHART.top, x2: CHART.left, y2: bottom}));
  for (let i = 0; i <= 4; i++) {
    const step = Math.round((xMax * i) / 4), value = yMin + ((yMax - yMin) * i) / 4;
    nodes.push(svg("text", {class: "tick", x: x(step), y: bottom + 16, "text-anchor": "middle"}, step));
    nodes.push(svg("line", {class: "grid", x1: CHART.left, y1: y(value), x2: CHART.width - CHART.right, y2: y(value)}));
    nodes.push(svg("text", {class: "tick", x: CHART.left - 6, y: y(value) + 4, "text-anchor": "end"},
                   value.toPrecision(3)));
  }
  nodes.push(svg("text", {class: "tick", x: (CHART.left + CHART.width) / 2, y: CHART.height - 4,
                          "text-anchor": "middle"}, "step"));
  return nodes;
}

function legend(lines) {
  return lines.map((line, i) => svg("g", {class: `legend ${line.kind}`,
                                          transform: `translate(${CHART.width - CHART.right - 150}, ${CHART.top + 4 + i * 18})`},
    svg("line", {class: `line ${line.kind}`, x1: 0, y1: 0, x2: 20, y2: 0}),
    svg("text", {class: "tick", x: 26, y: 4}, line.name)));
}

// ---- start ----

$("login-form").addEventListener("submit", login);
$("try-form").addEventListener("submit", tryModel);
$("logout").addEventListener("click", logout);
window.addEventListener("hashchange", route);
route();
