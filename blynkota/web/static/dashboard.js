// blynkota dashboard: refresh the numbers from the JSON API, confirm stops,
// and upload firmware with a progress bar (dry run first). Plain JavaScript.
"use strict";

const POLL_MS = 2000;
const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
const SEGMENTS = {
  "updated": ["updated"],
  "verifying": ["verifying"],
  "in-flight": ["offered", "downloading", "downloaded"],
  "pending": ["pending"],
  "failed": ["failed"],
  "incompatible": ["incompatible"],
  "ended": ["cancelled", "superseded"],
};

function showRollout(section, rollout) {
  const total = rollout.device_count || 0;
  for (const [name, states] of Object.entries(SEGMENTS)) {
    const count = states.reduce((sum, state) => sum + (rollout.counts[state] || 0), 0);
    const seg = section.querySelector(`[data-seg="${name}"]`);
    if (seg) seg.style.width = (total ? (100 * count) / total : 0) + "%";
    const number = section.querySelector(`[data-count="${name}"]`);
    if (number) number.textContent = count;
  }
  const all = section.querySelector('[data-count="total"]');
  if (all) all.textContent = total;
  const state = section.querySelector('[data-field="state"]');
  if (state) { state.textContent = rollout.state; state.className = "state " + rollout.state; }
  const reason = section.querySelector('[data-field="pause_reason"]');
  if (reason) {
    reason.textContent = reason.classList.contains("reason")
      ? (rollout.pause_reason ? " · paused: " + rollout.pause_reason : "")
      : (rollout.pause_reason || "-");
  }
  const reach = section.querySelector('[data-field="reach"]');
  if (reach) reach.textContent = rollout.reach || "";
  const wave = section.querySelector('[data-field="next_wave"]');
  if (wave) wave.textContent = rollout.next_wave || "-";
  enableButtons(section, rollout);
}

async function refreshDevices(table) {
  // The rollout's page: the same page again, its device table taken over.
  const answer = await fetch(window.location.href, { headers: { Accept: "text/html" } });
  if (!answer.ok) return;
  const page = new DOMParser().parseFromString(await answer.text(), "text/html");
  const fresh = page.querySelector("#devices tbody");
  if (fresh) table.replaceWith(fresh);
}

async function poll() {
  try {
    const table = document.querySelector("#devices tbody");
    if (table) await refreshDevices(table);
    // Only the rollouts on this page: /admin/ota/status?limit=… or ?rollout=…
    const url = document.querySelector("[data-poll]").dataset.poll;
    const answer = await fetch(url, { headers: { Accept: "application/json" } });
    if (answer.ok) {
      const byId = new Map((await answer.json()).map((rollout) => [String(rollout.id), rollout]));
      document.querySelectorAll("[data-rollout]").forEach((section) => {
        const rollout = byId.get(section.dataset.rollout);
        if (rollout) showRollout(section, rollout);
      });
    }
  } catch (error) {
    // The server restarting: the next poll tries again.
  }
  setTimeout(poll, POLL_MS);
}

function query(form) {
  const data = new FormData(form);
  const params = new URLSearchParams();
  const scope = data.get("scope");
  if (scope === "device") {
    params.set("token", data.get("token").trim());
  } else if (scope === "user") {
    params.set("user", data.get("user").trim());
    if (data.get("project").trim()) params.set("project", data.get("project").trim());
  }
  if (scope !== "device") {
    const tag = (data.get("tag") || "").trim();
    if (tag) params.set("tag", tag);
    for (const name of ["percent", "waves", "success", "maxConcurrent", "maxAttempts",
                        "attemptTimeout", "abortRatio", "healthWindow"]) {
      const value = (data.get(name) || "").trim();
      if (value) params.set(name, value);
    }
  }
  if (data.get("now")) params.set(scope === "device" ? "queue" : "now", "true");
  return params;
}

function send(form, params, onDone) {
  const progress = document.getElementById("upload-progress");
  const result = document.getElementById("upload-result");
  const file = form.elements.file.files[0];
  const body = new FormData();
  body.append("file", file, file.name);
  const request = new XMLHttpRequest();
  request.open("POST", "/admin/ota/start?" + params.toString());
  request.setRequestHeader("Accept", "application/json");
  request.setRequestHeader("X-CSRF-Token", csrf());
  progress.hidden = false;
  progress.value = 0;
  request.upload.onprogress = (event) => {
    if (event.lengthComputable) progress.value = (100 * event.loaded) / event.total;
  };
  request.onload = () => {
    progress.value = 100;
    if (request.status >= 200 && request.status < 300) {
      onDone(JSON.parse(request.responseText));
    } else {
      result.innerHTML = "";
      const line = document.createElement("span");
      line.className = "error";
      line.textContent = `${request.status}: ${request.responseText.trim()}`;
      result.append(line);
    }
  };
  request.onerror = () => { result.textContent = "The upload failed: the server did not answer."; };
  request.send(body);
}

const PLAN_ROWS = 20; // devices listed under a dry run's summary

function planTable(plan) {
  // The first devices the rollout would take in, and those it cannot update.
  const rows = plan.devices.slice(0, PLAN_ROWS).map((device) => [
    device.token.slice(0, 8) + "…", device.user, device.project, device.build || "-",
    device.online ? "online" : "offline", device.wave ?? "",
  ]).concat(plan.incompatible.slice(0, PLAN_ROWS).map((device) => [
    device.token.slice(0, 8) + "…", device.user, device.project, device.build || "-",
    "incompatible", device.reason,
  ]));
  const wrapper = document.createElement("div");
  wrapper.className = "scroll plan";
  if (!rows.length) return wrapper;
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const title of ["Device", "User", "Project", "Build now", "", "Wave / reason"]) {
    const cell = document.createElement("th");
    cell.textContent = title;
    head.append(cell);
  }
  const body = table.createTBody();
  for (const values of rows) {
    const row = body.insertRow();
    for (const value of values) row.insertCell().textContent = String(value);
  }
  wrapper.append(table);
  const more = plan.devices.length + plan.incompatible.length - rows.length;
  if (more > 0) {
    const note = document.createElement("p");
    note.className = "empty";
    note.textContent = `and ${more} more`;
    wrapper.append(note);
  }
  return wrapper;
}

// A rollout's buttons by its state: nothing to pause on a paused rollout.
const ALLOWED = {
  pause: ["active", "complete"],
  resume: ["paused"],
  stop: ["scheduled", "active", "paused", "complete"],
  retry: ["active", "paused", "complete"],
  expand: ["active", "paused", "complete"],
};

function enableButtons(section, rollout) {
  for (const [action, states] of Object.entries(ALLOWED)) {
    const button = section.querySelector(`button[value="${action}"]`);
    if (!button) continue;
    let allowed = states.includes(rollout.state);
    if (action === "retry") allowed = allowed && (rollout.counts.failed || 0) > 0;
    if (action === "expand") allowed = allowed && rollout.percent < 100;
    button.disabled = !allowed;
  }
}

function showTargetFields(form) {
  // Only the fields of the chosen target; without script every field shows.
  const scope = new FormData(form).get("scope");
  form.querySelectorAll("[data-for]").forEach((label) => {
    label.hidden = label.dataset.for !== scope;
  });
  form.querySelectorAll("[data-for-not]").forEach((label) => {
    label.hidden = label.dataset.forNot === scope;
  });
}

function setUpUpload(form) {
  const start = document.getElementById("start");
  const result = document.getElementById("upload-result");
  showTargetFields(form);
  form.addEventListener("change", () => showTargetFields(form));
  // Any change after a dry run asks for a new one.
  form.addEventListener("input", () => { start.disabled = true; });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = form.elements.file.files[0];
    if (!file) return;
    if (file.size > Number(form.dataset.maxSize)) {
      result.textContent = `The file is larger than ota.max.size (${form.dataset.maxSize} bytes).`;
      return;
    }
    const params = query(form);
    if (event.submitter && event.submitter.value === "start") {
      send(form, params, (started) => {
        window.location = `/admin/rollouts/${started.rollout}?notice=` +
          encodeURIComponent(`Rollout ${started.rollout} started: ${started.devices} device(s).`);
      });
      return;
    }
    if (params.has("token")) {
      result.textContent = `One device (${params.get("token").slice(0, 8)}…): ` +
        "its update starts when you press Start rollout.";
      start.disabled = false;
      return;
    }
    params.set("dryRun", "true");
    send(form, params, (plan) => {
      result.textContent = `Dry run: build ${plan.build || "?"} for ${plan.chip || "any chip"}, ` +
        `${plan.devices.length} device(s) would be taken in now` +
        (plan.incompatible.length ? `, ${plan.incompatible.length} incompatible` : "") +
        `. Nothing was started.`;
      result.append(planTable(plan));
      // A rollout that would take in nobody is not offered as a start.
      start.disabled = plan.devices.length === 0;
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.querySelector("[data-poll]")) setTimeout(poll, POLL_MS);
  document.querySelectorAll("[data-confirm]").forEach((button) => {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });
  const form = document.getElementById("upload");
  if (form) setUpUpload(form);
  document.querySelectorAll("[data-rollout][data-state]").forEach((section) => {
    enableButtons(section, JSON.parse(section.dataset.state));
  });
});
