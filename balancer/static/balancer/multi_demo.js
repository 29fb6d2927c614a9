// The /multi_demo/ page: the generation form, a task's live progress (POST /task, then GET /task/<id>), its results,
// the user's gallery and the cluster's status strip. Plain browser JavaScript, no build step. Everything that comes
// from the server goes into the page as text, never as HTML.

const config = JSON.parse(document.getElementById("demo-config").textContent);
const $ = (id) => document.getElementById(id);

const TERMINAL = new Set(["succeeded", "failed", "interrupted"]);
const POLL_MS = 400;
const STATUS_POLL_MS = 3000;
const MAX_POLL_FAILURES = 10;
const LAST_TASK_KEY = "sd_demo_last_task";
const DEFAULT_SAMPLER = "Euler a";
const DEFAULT_SCHEDULER = "automatic";

// ------------------------------------------------------------------------------------------------------- identity

function readCookie(name) {
  const prefix = `${name}=`;
  const entry = document.cookie.split("; ").find((part) => part.startsWith(prefix));
  return entry ? decodeURIComponent(entry.slice(prefix.length)) : "";
}

// Open mode: the browser is its own user, named by a random id kept in a cookie and sent as X-User-Id.
function browserUserId() {
  let id = readCookie(config.userCookie);
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = `guest-${Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("")}`;
    document.cookie = `${config.userCookie}=${id}; max-age=${365 * 24 * 3600}; path=/; SameSite=Lax`;
  }
  return id;
}

// A login (session) wins on the server; without one, open mode identifies the browser by its cookie.
const browserUser = config.user ? null : browserUserId();

function authHeaders(method = "GET") {
  const headers = {};
  if (browserUser) headers["X-User-Id"] = browserUser;
  if (method !== "GET") headers["X-CSRFToken"] = config.csrfToken;
  return headers;
}

// --------------------------------------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// A readable message from any error body the API answers: FastAPI's 422 list ({"detail": [{"loc", "msg"}]}), A1111's
// four keys ({"error", "detail", "body", "errors"}), a JSON string holding either (a task's error), or plain text.
function describeError(data, status) {
  if (typeof data === "string") {
    const text = data.trim();
    if (text.startsWith("{")) {
      try {
        return describeError(JSON.parse(text), status);
      } catch {
        // not JSON after all: show it as it is
      }
    }
    return text || fallbackMessage(status);
  }
  if (data && Array.isArray(data.detail) && data.detail.length) {
    let text = data.detail
      .map((entry) => {
        const where = Array.isArray(entry.loc) ? entry.loc.filter((part) => part !== "body").join(".") : "";
        const message = entry.msg || "invalid value";
        return where && !message.startsWith(`${where} `) ? `${where}: ${message}` : message;
      })
      .join("; ");
    if (Array.isArray(data.valid_values) && data.valid_values.length && !text.includes("valid values")) {
      text += ` (valid values: ${data.valid_values.join(", ")})`;
    }
    return text;
  }
  if (data && typeof data === "object") {
    for (const key of ["detail", "errors", "error"]) {
      if (typeof data[key] === "string" && data[key]) return data[key];
    }
  }
  return fallbackMessage(status);
}

function fallbackMessage(status) {
  return status ? `The server answered ${status} without saying why.` : "Something went wrong.";
}

async function api(url, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json", ...authHeaders(method) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (error) {
    throw new ApiError(`The server cannot be reached (${error.message}).`, 0);
  }
  const text = await response.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // an HTML error page from a proxy in front: describeError shows its text
  }
  if (!response.ok) {
    let message = describeError(data, response.status);
    if (response.status === 401) message += " Please log in again.";
    throw new ApiError(message, response.status);
  }
  return data;
}

// Result images need the caller's identity (X-User-Id or the session), which an <img src> cannot send: they are
// fetched once and shown from object URLs.
const imageCache = new Map(); // URL -> Promise of an object URL
const IMAGE_CACHE_LIMIT = 150; // a long session's gallery pages must not keep every image alive

function imageObjectURL(url) {
  if (!imageCache.has(url)) {
    const loading = fetch(url, { headers: authHeaders(), credentials: "same-origin" })
      .then(async (response) => {
        if (!response.ok) throw new ApiError(`the image could not be loaded (${response.status})`, response.status);
        return URL.createObjectURL(await response.blob());
      })
      .catch((error) => {
        imageCache.delete(url);
        throw error;
      });
    imageCache.set(url, loading);
    forgetOldImages();
  }
  return imageCache.get(url);
}

// The oldest entries leave the cache; their memory is freed unless an image on the page still shows them.
function forgetOldImages() {
  for (const [url, loading] of imageCache) {
    if (imageCache.size <= IMAGE_CACHE_LIMIT) return;
    imageCache.delete(url);
    loading.then(
      (objectURL) => {
        if (!document.querySelector(`img[src="${objectURL}"]`)) URL.revokeObjectURL(objectURL);
      },
      () => {},
    );
  }
}

// -------------------------------------------------------------------------------------------------- small helpers

function element(tag, { text, className, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" }); // below the form on a phone, above the fold on a long desktop form
}

function clearMessage() {
  const box = $("message");
  box.hidden = true;
  box.textContent = "";
}

function formatSeconds(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
}

function parseInfo(info) {
  if (info && typeof info === "object") return info;
  try {
    const parsed = JSON.parse(info || "{}");
    return parsed && typeof parsed === "object" ? parsed : {};
  } catch {
    return {};
  }
}

// ------------------------------------------------------------------------------------------------------ the form

function fillSelect(select, choices, preferred) {
  select.replaceChildren(...choices.map(({ value, label }) => element("option", { text: label, attrs: { value } })));
  const wanted = preferred.find((value) => choices.some((choice) => choice.value === value));
  if (wanted !== undefined) select.value = wanted;
}

async function loadChoices() {
  const urls = config.urls;
  const [models, samplers, schedulers, options] = await Promise.allSettled([
    api(urls.models),
    api(urls.samplers),
    api(urls.schedulers),
    api(urls.options),
  ]);
  const failed = [];
  if (models.status === "fulfilled" && Array.isArray(models.value) && models.value.length) {
    const current = options.status === "fulfilled" ? options.value?.sd_model_checkpoint : undefined;
    const choices = models.value.map((model) => ({ value: model.title, label: model.model_name || model.title }));
    fillSelect($("model"), choices, [current, choices[0].value]);
  } else {
    fillSelect($("model"), [{ value: "", label: "The node's default" }], [""]);
    failed.push(["models", models.reason?.message || "the node lists no checkpoints"]);
  }
  if (samplers.status === "fulfilled" && Array.isArray(samplers.value)) {
    const choices = samplers.value.map((sampler) => ({ value: sampler.name, label: sampler.name }));
    fillSelect($("sampler"), choices, [DEFAULT_SAMPLER]);
  } else {
    fillSelect($("sampler"), [{ value: "", label: "Default" }], [""]);
    failed.push(["samplers", samplers.reason?.message]);
  }
  if (schedulers.status === "fulfilled" && Array.isArray(schedulers.value)) {
    const choices = schedulers.value.map((scheduler) => ({ value: scheduler.name, label: scheduler.label }));
    fillSelect($("scheduler"), choices, [DEFAULT_SCHEDULER]);
  } else {
    fillSelect($("scheduler"), [{ value: "", label: "Automatic" }], [""]);
    failed.push(["schedulers", schedulers.reason?.message]);
  }
  if (failed.length) {
    const lines = failed.map(([what, why]) => `${what}: ${why || "unavailable"}`);
    showMessage(`Some choices could not be loaded (${lines.join("; ")}). Defaults are used.`, "warning");
  }
}

function numberField(id, parse = Number.parseInt) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined; // the API's default
  const value = parse(raw, 10);
  return Number.isFinite(value) ? value : undefined;
}

let initImage = null; // raw base64 of the chosen init image

function readInitImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

// The POST /task body: {"api", "payload"} with A1111's field names.
function taskBody() {
  const mode = currentMode();
  const payload = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    steps: numberField("steps"),
    cfg_scale: numberField("cfg-scale", Number.parseFloat),
    width: numberField("width"),
    height: numberField("height"),
    seed: $("seed-random").checked ? -1 : (numberField("seed") ?? -1),
    batch_size: numberField("batch-size"),
    n_iter: 1,
    send_images: true,
    save_images: false,
  };
  if ($("sampler").value) payload.sampler_name = $("sampler").value;
  if ($("scheduler").value) payload.scheduler = $("scheduler").value;
  if ($("model").value) payload.override_settings = { sd_model_checkpoint: $("model").value };
  if (mode === "img2img") {
    if (!initImage) throw new Error("Choose an init image for img2img.");
    payload.init_images = [initImage];
    payload.denoising_strength = numberField("denoising-strength", Number.parseFloat);
  }
  return { api: mode === "img2img" ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", payload };
}

function useSeed(seed) {
  $("seed-random").checked = false;
  $("seed").disabled = false;
  $("seed").value = String(seed);
  showMessage(`Seed ${seed} will be used for the next generation.`, "info");
  $("seed").focus();
}

// --------------------------------------------------------------------------------------------------- generating

let active = null; // the task being followed: {id, timer, failures, runningSince}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
}

function setProgress(value, text) {
  if (value !== null) $("progress").value = Math.min(1, Math.max(0, value));
  $("progress-text").textContent = text;
}

function setPreview(preview) {
  const frame = $("preview-frame");
  if (!preview) {
    frame.hidden = true;
    return;
  }
  $("preview").src = preview.startsWith("data:") ? preview : `data:image/png;base64,${preview}`;
  frame.hidden = false;
}

async function generate(event) {
  event.preventDefault();
  if (active) return;
  clearMessage();
  let body;
  try {
    body = taskBody();
  } catch (error) {
    showMessage(error.message, "error");
    return;
  }
  setBusy(true);
  setPreview(null);
  $("results").replaceChildren();
  setProgress(0, "Submitting…");
  $("progress").scrollIntoView({ block: "nearest" });
  try {
    const { taskId } = await api(config.urls.tasks, { method: "POST", body });
    follow(taskId);
    refreshStatus();
  } catch (error) {
    setBusy(false);
    setProgress(0, "Idle");
    showMessage(error.message, "error");
  }
}

function follow(taskId) {
  active = { id: taskId, timer: null, failures: 0, runningSince: null };
  sessionStorage.setItem(LAST_TASK_KEY, taskId);
  setBusy(true);
  poll(active);
}

function finish(task) {
  if (active !== task) return false;
  clearTimeout(task.timer);
  active = null;
  setBusy(false);
  return true;
}

async function poll(task) {
  let doc;
  try {
    doc = await api(`${config.urls.tasks}/${task.id}`);
    task.failures = 0;
  } catch (error) {
    if (active !== task) return;
    if (error.status === 404 || error.status === 401 || ++task.failures >= MAX_POLL_FAILURES) {
      finish(task);
      setProgress(null, "Stopped");
      showMessage(`Lost track of the generation: ${error.message}`, "error");
      return;
    }
    setProgress(null, `Connection trouble (${error.message}); retrying…`);
    task.timer = setTimeout(() => poll(task), POLL_MS * 2);
    return;
  }
  if (active !== task) return; // interrupted or replaced meanwhile
  if (TERMINAL.has(doc.status)) {
    finish(task);
    await showOutcome(doc);
    loadGallery();
    refreshStatus();
    return;
  }
  showProgress(doc, task);
  task.timer = setTimeout(() => poll(task), POLL_MS);
}

// The task document's live fields (step, steps, eta, preview) are used when the server sends them; without them the
// bar follows `progress` and the ETA is estimated here.
function showProgress(doc, task) {
  if (doc.status === "queued") {
    setProgress(0, doc.queuePosition ? `Queued: position ${doc.queuePosition}` : "Queued");
    return;
  }
  if (doc.queuePosition && !(Number(doc.progress) > 0)) {
    // On its node, behind other users' jobs (when the task document says so).
    setProgress(0, `Queued on ${doc.node ? `node ${doc.node}` : "the node"}: position ${doc.queuePosition}`);
    return;
  }
  const fraction = Math.min(1, Math.max(0, Number(doc.progress) || 0));
  const now = performance.now();
  if (task.runningSince === null) task.runningSince = now;
  const parts = [];
  if (doc.batches > 1) parts.push(`Batch ${(doc.batch || 0) + 1}/${doc.batches}`);
  if (doc.steps > 0) parts.push(`Step ${doc.step || 0}/${doc.steps}`);
  parts.push(`${Math.round(fraction * 100)}%`);
  let eta = typeof doc.eta === "number" ? doc.eta : null;
  if (eta === null && fraction > 0.02) {
    const elapsed = (now - task.runningSince) / 1000;
    eta = elapsed / fraction - elapsed;
  }
  if (eta !== null && formatSeconds(eta)) parts.push(`ETA ${formatSeconds(eta)}`);
  const text = fraction === 0 && !(doc.steps > 0) ? "Starting on a node…" : parts.join(" · ");
  setProgress(fraction, text);
  if (doc.preview) setPreview(doc.preview);
}

async function showOutcome(doc) {
  const images = doc.result?.images || [];
  if (doc.status === "succeeded") {
    setProgress(1, `Done${doc.node ? ` on node ${doc.node}` : ""}`);
    setPreview(null);
  } else if (doc.status === "interrupted") {
    setProgress(null, "Interrupted");
    showMessage(images.length ? "Interrupted: the images so far are below." : "Interrupted.", "info");
  } else {
    setProgress(0, "Failed");
    setPreview(null);
    showMessage(`Generation failed: ${describeError(doc.error || "", 0)}`, "error");
  }
  const info = parseInfo(doc.result?.info);
  const seeds = Array.isArray(info.all_seeds) ? info.all_seeds : [];
  const infotexts = Array.isArray(info.infotexts) ? info.infotexts : [];
  const first = Number.isInteger(info.index_of_first_image) ? info.index_of_first_image : 0;
  const cards = images.map((url, index) =>
    imageCard({
      url,
      index,
      taskId: doc.taskId,
      seed: seeds[index - first],
      infotext: infotexts[index] || "",
      node: doc.node,
      open: true,
      className: "result-card",
    }),
  );
  $("results").replaceChildren(...cards);
  if (images.length) setPreview(null);
}

async function interrupt() {
  const task = active;
  if (!task) return;
  $("interrupt").disabled = true;
  setProgress(null, "Interrupting…");
  try {
    const doc = await api(`${config.urls.tasks}/${task.id}/cancel`, { method: "POST" });
    if (finish(task)) {
      await showOutcome(doc);
      loadGallery();
    }
  } catch (error) {
    if (active === task) $("interrupt").disabled = false;
    showMessage(`Interrupt failed: ${error.message}`, "error");
  }
}

// A reload shows the last task again: still running, it is followed; finished, its images are shown.
async function resumeLastTask() {
  const taskId = sessionStorage.getItem(LAST_TASK_KEY);
  if (!taskId) return;
  try {
    const doc = await api(`${config.urls.tasks}/${taskId}`);
    if (!TERMINAL.has(doc.status)) {
      if (!active) follow(taskId);
    } else if (doc.result?.images?.length && !active) {
      await showOutcome(doc);
    }
  } catch {
    sessionStorage.removeItem(LAST_TASK_KEY); // gone (another user's browser, a wiped database): forget it
  }
}

// ---------------------------------------------------------------------------------------------------- image cards

function imageCard({ url, index, taskId, seed, infotext, node, user, caption, open, className }) {
  const image = element("img", { attrs: { alt: caption || `Generated image ${index + 1}` } });
  const link = element("a", { className: "image-link", attrs: { target: "_blank", rel: "noopener" } }, [image]);
  const download = element("a", {
    text: "Download",
    className: "button download",
    attrs: { download: `sd-${String(taskId).slice(0, 8)}-${url.split("/").pop()}`, "aria-disabled": "true" },
  });
  imageObjectURL(url)
    .then((objectURL) => {
      image.src = objectURL;
      link.href = objectURL;
      download.href = objectURL;
      download.removeAttribute("aria-disabled");
    })
    .catch((error) => {
      image.replaceWith(element("p", { className: "image-error", text: `Not shown: ${error.message}` }));
    });
  const meta = element("div", { className: "meta" });
  if (seed !== undefined && seed !== null) meta.append(element("span", { className: "seed", text: `Seed ${seed}` }));
  if (node) meta.append(element("span", { className: "node", text: `Node ${node}` }));
  if (user) meta.append(element("span", { className: "owner", text: `User ${user}` }));
  const actions = element("div", { className: "card-actions" }, [download]);
  if (seed !== undefined && seed !== null) {
    const reuse = element("button", { text: "Use seed", className: "reuse-seed", attrs: { type: "button" } });
    reuse.addEventListener("click", () => useSeed(seed));
    actions.prepend(reuse);
  }
  const text = element("pre", { className: "infotext", text: infotext || "(no parameters recorded)" });
  const details = open ? text : element("details", {}, [element("summary", { text: "Parameters" }), text]);
  const children = [link];
  if (caption) children.push(element("p", { className: "caption", text: caption }));
  children.push(meta, details, actions);
  return element("article", { className: `card ${className}` }, children);
}

// -------------------------------------------------------------------------------------------------------- gallery

const gallery = { page: 1, scope: "mine", request: 0 };

async function loadGallery() {
  const request = ++gallery.request;
  const query = new URLSearchParams({ page: String(gallery.page) });
  if (gallery.scope === "all") query.set("scope", "all");
  let data;
  try {
    data = await api(`${config.urls.gallery}?${query}`);
  } catch (error) {
    if (request !== gallery.request) return;
    $("gallery").replaceChildren(element("p", { className: "empty", text: `The gallery: ${error.message}` }));
    return;
  }
  if (request !== gallery.request) return; // a newer page was asked for meanwhile
  if (data.count > 0 && data.page > data.pages) {
    gallery.page = data.pages;
    loadGallery();
    return;
  }
  const cards = data.items.flatMap((item) =>
    item.images.map((image, index) =>
      imageCard({
        url: image.url,
        index,
        taskId: item.taskId,
        seed: image.seed,
        infotext: image.infotext,
        node: item.node,
        user: data.scope === "all" ? item.user : null,
        caption: item.prompt || "(no prompt)",
        open: false,
        className: "gallery-card",
      }),
    ),
  );
  const empty = data.scope === "all" ? "Nobody has generated an image yet." : "No images yet: yours appear here.";
  $("gallery").replaceChildren(...(cards.length ? cards : [element("p", { className: "empty", text: empty })]));
  const generations = `${data.count} generation${data.count === 1 ? "" : "s"}`;
  $("gallery-page-label").textContent = `Page ${data.page} of ${data.pages} · ${generations}`;
  $("gallery-prev").disabled = data.page <= 1;
  $("gallery-next").disabled = data.page >= data.pages;
}

// --------------------------------------------------------------------------------------------------- status strip

async function refreshStatus() {
  try {
    const status = await api(config.urls.status);
    $("status-nodes").textContent = `${status.up}/${status.total} up`;
    $("status-nodes").title = "";
    $("status-dot").className = `dot ${status.up === 0 ? "down" : status.up < status.total ? "partial" : "up"}`;
    const pin = status.pin;
    $("status-pin").textContent = pin ? `${pin.node_id || pin.url}${pin.lost ? " (lost)" : ""}` : "none";
    $("status-queue").textContent = String(status.queue_depth);
  } catch (error) {
    $("status-nodes").textContent = "unknown";
    $("status-nodes").title = error.message;
    $("status-dot").className = "dot down";
  }
}

async function watchStatus() {
  await refreshStatus();
  setTimeout(watchStatus, STATUS_POLL_MS);
}

// ----------------------------------------------------------------------------------------------------------- wiring

function wire() {
  $("whoami").textContent = config.user
    ? `Signed in as ${config.user}${config.isStaff ? " (staff)" : ""}`
    : `You are ${browserUser}`;
  $("batch-size").max = String(Math.max(1, Math.min(8, config.maxBatch)));
  $("steps").max = String(config.maxSteps);
  $("generate-form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
  });
  $("batch-size").addEventListener("input", () => {
    $("batch-size-value").textContent = $("batch-size").value;
  });
  $("denoising-strength").addEventListener("input", () => {
    $("denoising-strength-value").textContent = $("denoising-strength").value;
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      $("img2img-fields").hidden = currentMode() !== "img2img";
    });
  }
  $("init-image").addEventListener("change", async () => {
    const file = $("init-image").files[0];
    initImage = null;
    $("init-preview").hidden = true;
    if (!file) return;
    try {
      const dataURL = await readInitImage(file);
      initImage = dataURL.slice(dataURL.indexOf(",") + 1);
      $("init-preview").src = dataURL;
      $("init-preview").hidden = false;
    } catch (error) {
      showMessage(`The init image could not be read: ${error.message}`, "error");
    }
  });
  $("gallery-prev").addEventListener("click", () => {
    gallery.page = Math.max(1, gallery.page - 1);
    loadGallery();
  });
  $("gallery-next").addEventListener("click", () => {
    gallery.page += 1;
    loadGallery();
  });
  $("gallery-scope")?.addEventListener("change", () => {
    gallery.scope = $("gallery-scope").value;
    gallery.page = 1;
    loadGallery();
  });
}

wire();
loadChoices();
loadGallery();
watchStatus();
resumeLastTask();
