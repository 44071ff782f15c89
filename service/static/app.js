// Lantern's web page: plain JavaScript against the public API, no build step.
//
//   POST predict?top_k=5          the image as file field "image"     -> bars
//   GET  models                   the model store's versions          -> "Model version" select
//   POST explain                  file field "images" + form fields   -> 202 {job_id, status_url}
//                                 (model=<version>: one job per version when comparing two)
//   GET  jobs/{id}                status, progress, manifest          -> progress bar, results
//   GET  jobs/{id}/{file}         each artifact                       -> <img> and download links
//
// When the service has API keys (LANTERN_API_KEYS) and answers 401, the page asks for a key
// once, keeps it in sessionStorage for this tab, and sends it as `Authorization: Bearer` on
// every request; images and downloads are fetched as blobs, since <img src> and links
// cannot carry a header.
//
// Every failure ends up in the banner as a sentence: the API's {"error": "..."} message,
// a failed job's reason, or what to do when the service cannot be reached.
"use strict";

(function () {
  const TOP_K = 5;
  const POLL_MS = 500;
  const SLOW_QUEUE_MS = 15000;
  const METHOD_NAMES = {
    gradcam: "Grad-CAM",
    gradcam_pp: "Grad-CAM++",
    layercam: "LayerCAM",
    saliency: "Saliency",
    activations: "Activations",
    depth: "Across depth",
  };
  const KIND_NAMES = {
    heatmap: "Heatmap",
    overlay: "Overlay",
    grid: "Activation grid",
    raw: "Raw map (.npy)",
    channels: "Channels (.npy)",
    depth: "Strongest feature maps by stage",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    error: $("error"),
    errorText: $("error-text"),
    errorClose: $("error-close"),
    dropzone: $("dropzone"),
    fileInput: $("file-input"),
    predictionSection: $("prediction-section"),
    preview: $("preview"),
    fileName: $("file-name"),
    predictStatus: $("predict-status"),
    topLabel: $("top-label"),
    bars: $("bars"),
    modelVersion: $("model-version"),
    explainSection: $("explain-section"),
    explainForm: $("explain-form"),
    explainButton: $("explain-button"),
    layer: $("layer"),
    model: $("model"),
    compareModel: $("compare-model"),
    compareModelField: $("compare-model-field"),
    faithfulness: $("faithfulness"),
    compareTop: $("compare-top"),
    target: $("target"),
    job: $("job"),
    jobProgress: $("job-progress"),
    jobStatus: $("job-status"),
    resultsSection: $("results-section"),
    resultsSummary: $("results-summary"),
    results: $("results"),
    downloadList: $("download-list"),
    keyForm: $("key-form"),
    keyMessage: $("key-message"),
    keyInput: $("key-input"),
    demoBanner: $("demo-banner"),
    demoText: $("demo-text"),
  };

  // Each new image or explanation bumps the generation; stale answers are dropped.
  let generation = 0;
  let currentFile = null;
  let previewUrl = null;

  // --- talking to the API ------------------------------------------------------------------

  class ApiError extends Error {}

  const KEY_STORAGE = "lantern.apiKey";
  let apiKey = sessionStorage.getItem(KEY_STORAGE);
  let keyRequest = null; // one prompt shared by every request that got a 401

  // fetch() with the API key; on 401 ask for a (new) key and send the request again.
  async function authorizedFetch(path, options) {
    for (;;) {
      const sentKey = apiKey;
      const init = Object.assign({}, options || {});
      const headers = new Headers(init.headers || {});
      if (sentKey) headers.set("Authorization", "Bearer " + sentKey);
      init.headers = headers;
      const response = await fetch(path, init);
      if (response.status !== 401) return response;
      let message = "";
      try {
        const body = await response.json();
        message = body && typeof body.error === "string" ? body.error : "";
      } catch (e) {
        message = "";
      }
      if (apiKey === sentKey) {
        // Not yet replaced by another request's prompt: this key is missing or wrong.
        apiKey = null;
        sessionStorage.removeItem(KEY_STORAGE);
        await askForKey(
          sentKey
            ? "That API key was not accepted. Enter a valid key for this Lantern service."
            : "This Lantern service needs an API key" + (message ? " (" + message + ")" : "") + "."
        );
      }
    }
  }

  function askForKey(message) {
    if (keyRequest) return keyRequest;
    keyRequest = new Promise((resolve) => {
      el.keyMessage.textContent = message;
      el.keyInput.value = "";
      el.keyForm.hidden = false;
      el.keyInput.focus();
      const onSubmit = (event) => {
        event.preventDefault();
        const key = el.keyInput.value.trim();
        if (!key) return;
        el.keyForm.removeEventListener("submit", onSubmit);
        el.keyForm.hidden = true;
        apiKey = key;
        sessionStorage.setItem(KEY_STORAGE, key);
        keyRequest = null;
        resolve(key);
      };
      el.keyForm.addEventListener("submit", onSubmit);
    });
    return keyRequest;
  }

  // An artifact as an object URL (an <img src> cannot send the key).
  async function blobUrl(path) {
    const response = await authorizedFetch(path);
    if (!response.ok) throw new ApiError("HTTP " + response.status);
    return URL.createObjectURL(await response.blob());
  }

  async function api(path, options) {
    let response;
    try {
      response = await authorizedFetch(path, options);
    } catch (e) {
      throw new ApiError(
        "Cannot reach the Lantern service. Check that it is running (`lantern up`) and reload the page."
      );
    }
    let body = null;
    const text = await response.text();
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const message = body && typeof body.error === "string" ? body.error : text.slice(0, 200);
      throw new ApiError(describeStatus(response.status, message));
    }
    if (body === null || typeof body !== "object") {
      throw new ApiError("The service sent an answer this page does not understand.");
    }
    return { status: response.status, body: body };
  }

  function describeStatus(status, message) {
    // 4xx messages are written for people already: what was wrong and what to do.
    const detail = message || "no details";
    if (status === 503) return "Unavailable right now: " + detail;
    if (status >= 500) return "The service failed (HTTP " + status + "): " + detail;
    return capitalize(detail);
  }

  // --- messages ---------------------------------------------------------------------------

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = "";
  }

  el.errorClose.addEventListener("click", clearError);

  // --- choosing an image ------------------------------------------------------------------

  el.fileInput.addEventListener("change", () => {
    if (el.fileInput.files && el.fileInput.files.length) chooseFile(el.fileInput.files[0]);
  });

  ["dragenter", "dragover"].forEach((type) =>
    el.dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      el.dropzone.classList.add("dragging");
    })
  );
  ["dragleave", "drop"].forEach((type) =>
    el.dropzone.addEventListener(type, () => el.dropzone.classList.remove("dragging"))
  );
  el.dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) chooseFile(files[0]);
  });

  // A file dropped beside the drop zone must not make the browser navigate away to it.
  ["dragover", "drop"].forEach((type) => window.addEventListener(type, (event) => event.preventDefault()));

  function chooseFile(file) {
    generation += 1; // drops the answers of any prediction or job still running
    currentFile = file;
    clearError();
    resetResults();
    el.explainButton.disabled = false;
    el.explainSection.hidden = true;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    el.preview.hidden = false;
    el.preview.onerror = () => {
      el.preview.hidden = true;
    };
    el.preview.src = previewUrl;
    el.fileName.textContent = file.name + " · " + formatBytes(file.size);
    el.predictionSection.hidden = false;
    predict(file, generation);
  }

  async function predict(file, gen) {
    el.predictStatus.textContent = "Asking the model…";
    el.topLabel.textContent = "";
    el.bars.replaceChildren();
    el.modelVersion.textContent = "";
    const form = new FormData();
    form.append("image", file, file.name);
    try {
      const { body } = await api("predict?top_k=" + TOP_K, { method: "POST", body: form });
      if (gen !== generation) return;
      el.predictStatus.textContent = "";
      showPrediction(body);
      el.explainSection.hidden = false;
      loadLayers();
      loadVersions();
    } catch (e) {
      if (gen !== generation) return;
      el.predictionSection.hidden = true; // the banner says why
      showError(e.message);
    }
  }

  // The layer select offers the model's own convolutional stages (GET /model), each with
  // the size of its feature map; the options in index.html stay if the model does not
  // list its layers (an older bundle) or the route cannot be read.
  let layersLoaded = false;
  async function loadLayers() {
    if (layersLoaded) return;
    layersLoaded = true;
    let info;
    try {
      info = (await api("model")).body;
    } catch (e) {
      return;
    }
    showDemo(info);
    const layers = (info.explainable_layers || []).filter((l) => !l.name.includes("."));
    const stages = layers.filter((l) => /^layer\d+$/.test(l.name));
    const shown = stages.length ? stages : layers;
    if (!shown.length) return;
    const current = el.layer.value;
    const last = shown[shown.length - 1].name;
    el.layer.replaceChildren(
      ...shown.map((l) => {
        const option = document.createElement("option");
        option.value = l.name;
        let text = l.name + " · " + l.shape.join("×");
        if (l.name === last) text += " (last stage: coarse, most semantic)";
        else if (l.name === shown[0].name) text += " (first stage: fine, low-level)";
        option.textContent = text;
        return option;
      })
    );
    el.layer.value = shown.some((l) => l.name === current) ? current : last;
  }

  // The "Model version" select offers every version in the model store (GET /models),
  // newest first, the served one chosen; "Compare with" offers them again, shown only when
  // there are two or more. If the route cannot be read, "the served model" stays (no
  // `model=` is sent) and nothing can be compared.
  let versionsLoaded = false;
  let servedTag = null;
  async function loadVersions() {
    if (versionsLoaded) return;
    versionsLoaded = true;
    let listing;
    try {
      listing = (await api("models")).body;
    } catch (e) {
      return;
    }
    const versions = Array.isArray(listing.versions) ? listing.versions : [];
    const served = versions.find((v) => v.tag === listing.served);
    if (!served) return;
    servedTag = listing.served;
    const option = (v) => new Option(versionLabel(v), v.version);
    el.model.replaceChildren(...versions.map(option));
    el.model.value = served.version;
    el.compareModel.replaceChildren(new Option("no: this version only", ""), ...versions.map(option));
    el.compareModelField.hidden = versions.length < 2;
  }

  // "<version> (served) · resnet18 · 92.1% · 2026-12-01 14:03" and "· demo" for the demo model.
  function versionLabel(v) {
    const parts = [v.version + (v.tag === servedTag ? " (served)" : "")];
    if (v.architecture) parts.push(v.architecture);
    if (typeof v.accuracy === "number") parts.push(percent(v.accuracy));
    if (v.created_at) parts.push(String(v.created_at).slice(0, 16).replace("T", " "));
    if (v.demo) parts.push("demo");
    return parts.join(" · ");
  }

  function versionOf(tag) {
    const i = String(tag).indexOf(":");
    return i < 0 ? String(tag) : String(tag).slice(i + 1);
  }

  // A demo model (GET /model "demo": one line saying what it knows) gets a banner from the
  // start. This first look never asks for a key: if the service wants one it is not known
  // yet, and loadLayers (after the first prediction, key given) shows the banner instead.
  function showDemo(info) {
    if (!info || typeof info.demo !== "string" || !info.demo) return;
    el.demoText.textContent = info.demo;
    el.demoBanner.hidden = false;
  }

  (async function lookForDemo() {
    try {
      const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
      const response = await fetch("model", { headers });
      if (response.ok) showDemo(await response.json());
    } catch (e) {
      // the service is unreachable: the first request says so
    }
  })();

  function showPrediction(p) {
    el.topLabel.textContent = p.label + " · " + percent(p.probability);
    el.bars.replaceChildren(
      ...p.top_k.map((entry) => {
        const li = document.createElement("li");
        li.className = "bar";
        li.dataset.classIndex = String(entry.class_index);
        const name = document.createElement("span");
        name.className = "bar-label";
        name.textContent = entry.label;
        const track = document.createElement("span");
        track.className = "bar-track";
        track.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.className = "bar-fill";
        fill.style.width = Math.max(0.5, entry.probability * 100).toFixed(1) + "%";
        track.append(fill);
        const value = document.createElement("span");
        value.className = "bar-value";
        value.textContent = percent(entry.probability);
        li.append(name, track, value);
        return li;
      })
    );
    el.modelVersion.textContent = "model version " + p.model_version;
    el.target.replaceChildren(new Option("the top prediction (" + p.label + ")", ""));
    p.top_k.forEach((entry) =>
      el.target.append(new Option(entry.label + " (" + percent(entry.probability) + ")", entry.class_index))
    );
  }

  // --- explaining -------------------------------------------------------------------------

  el.explainForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!currentFile) return;
    const methods = Array.from(el.explainForm.querySelectorAll('input[name="methods"]:checked')).map(
      (input) => input.value
    );
    if (!methods.length) {
      showError("Choose at least one explanation method.");
      return;
    }
    const compareTop = el.compareTop.value;
    if (compareTop !== "" && el.target.value !== "") {
      showError(
        "Comparing the top classes explains the image's own most probable classes: set “Class to explain” " +
          "back to the top prediction, or stop comparing."
      );
      return;
    }
    const model = el.model.value;
    const compareWith = el.compareModel.value;
    if (compareWith !== "" && compareWith === model) {
      showError("“Compare with” names the version already chosen: pick another version, or stop comparing.");
      return;
    }
    generation += 1;
    explain(currentFile, {
      methods: methods,
      layer: el.layer.value,
      target: el.target.value,
      faithfulness: el.faithfulness.checked,
      compareTop: compareTop,
      models: compareWith !== "" ? [model, compareWith] : [model],
    }, generation);
  });

  // One job per model version ("" = the served one, no model= sent); with two, the second
  // is queued before the first is waited for, so the workers can take both at once.
  async function explain(file, options, gen) {
    clearError();
    resetResults();
    el.explainButton.disabled = true;
    setProgress("Sending the image…", 0, 1);
    const comparing = options.models.length > 1;
    try {
      const submitted = [];
      for (const model of options.models) {
        const { body } = await api("explain", { method: "POST", body: explainForm(file, options, model) });
        if (gen !== generation) return;
        submitted.push(body);
      }
      const runs = [];
      for (let i = 0; i < submitted.length; i += 1) {
        const body = submitted[i];
        const label = comparing ? "Version " + options.models[i] + ": " : "";
        const status = body.status === "finished" ? body : await waitForJob(body, gen, label);
        if (status === null) return; // superseded
        runs.push({ manifest: status.manifest, jobId: status.job_id || status.id, cached: body.cached });
      }
      showResults(runs);
      el.job.hidden = true;
    } catch (e) {
      if (gen !== generation) return;
      el.job.hidden = true;
      showError(e.message);
    } finally {
      if (gen === generation) el.explainButton.disabled = false;
    }
  }

  function explainForm(file, options, model) {
    const form = new FormData();
    form.append("images", file, file.name);
    form.append("methods", options.methods.join(","));
    form.append("layer", options.layer);
    if (options.target !== "") form.append("targets", options.target);
    if (options.faithfulness) form.append("faithfulness", "true");
    if (options.compareTop) form.append("compare_top", options.compareTop);
    if (model) form.append("model", model);
    return form;
  }

  // `label` names the version while two are compared ("Version 1a2b…: "), else "".
  async function waitForJob(submitted, gen, label) {
    const url = submitted.status_url.replace(/^\//, "");
    const started = Date.now();
    let status = submitted;
    for (;;) {
      if (status.status === "finished") return status;
      if (status.status === "failed") {
        throw new ApiError(label + "The explanation failed: " + (status.error || "no reason given"));
      }
      const progress = status.progress || { done: 0, total: 1 };
      if (status.status === "queued") {
        const slow = Date.now() - started > SLOW_QUEUE_MS;
        setProgress(
          label +
            (slow ? "Queued — still waiting for a worker; is `lantern worker` running?" : "Queued — waiting for a worker…"),
          0,
          progress.total || 1
        );
      } else {
        setProgress(
          label + "Computing: " + progress.done + " of " + progress.total + " image(s) done…",
          progress.done,
          progress.total || 1
        );
      }
      await sleep(POLL_MS);
      if (gen !== generation) return null;
      status = (await api(url)).body;
      if (gen !== generation) return null;
    }
  }

  function setProgress(text, done, total) {
    el.job.hidden = false;
    el.jobProgress.max = total;
    el.jobProgress.value = done;
    el.jobStatus.textContent = text;
  }

  // --- results ----------------------------------------------------------------------------

  function resetResults() {
    el.results.replaceChildren();
    el.downloadList.replaceChildren();
    el.resultsSection.hidden = true;
    el.job.hidden = true;
  }

  // runs: [{manifest, jobId, cached}], one per model version asked for. Each run's results
  // sit under a heading naming the version that explained them (the manifest's own `model`,
  // what the worker ran); two runs stand side by side, in the order they were asked for.
  function showResults(runs) {
    runs.forEach((run) => {
      if (!run.manifest || !run.manifest.images || !run.manifest.images.length) {
        throw new ApiError("The job finished but sent no results.");
      }
    });
    const comparing = runs.length > 1;
    el.resultsSummary.textContent = comparing
      ? "The same image explained by " + runs.length + " model versions, side by side: " +
        runs.map((run) => versionOf(run.manifest.model)).join(" and ") + "."
      : runSummary(runs[0]);
    el.results.classList.toggle("versions", comparing);
    el.results.replaceChildren(...runs.map((run) => versionResults(run, comparing)));
    const downloads = [];
    runs.forEach((run) => {
      const note = comparing ? " · version " + versionOf(run.manifest.model) : "";
      runDownloads(run.manifest.images[0]).forEach((d) => downloads.push({ key: d.key, url: d.url, note: d.note + note }));
    });
    el.downloadList.replaceChildren(...downloads.map(downloadItem));
    el.resultsSection.hidden = false;
  }

  // “label” (probability) at layer · … · job id
  function runSummary(run) {
    const manifest = run.manifest;
    const image = manifest.images[0];
    const t = image.target;
    return (
      "Explaining “" + t.label + "” (" + percent(t.probability) + ") at " + manifest.layer +
      (image.compare ? " · beside its top " + image.compare.length + " classes" : "") +
      (run.cached ? " · answered from an earlier identical request" : "") + " · job " + run.jobId
    );
  }

  function versionResults(run, comparing) {
    const manifest = run.manifest;
    const box = document.createElement("section");
    box.className = "version-results";
    box.dataset.model = manifest.model || "";
    box.dataset.jobId = run.jobId;
    const name = document.createElement("h3");
    name.className = "version-name";
    name.title = manifest.model || "";
    name.textContent =
      "Model version " + versionOf(manifest.model) + (manifest.model === servedTag ? " (served)" : "");
    box.append(name);
    if (comparing) {
      const summary = document.createElement("p");
      summary.className = "version-summary muted small";
      summary.textContent = runSummary(run);
      box.append(summary);
    }
    box.append(...methodRows(manifest));
    return box;
  }

  function methodRows(manifest) {
    const image = manifest.images[0];
    const urls = image.urls || {};
    return manifest.methods.map((method) => {
      const row = document.createElement("article");
      row.className = "result";
      row.dataset.method = method;
      const heading = document.createElement("h3");
      heading.textContent = METHOD_NAMES[method] || method;
      if (method === "activations") {
        heading.textContent += " (" + (manifest.activation_layer || manifest.layer) + ")";
      }
      const grid = document.createElement("div");
      grid.className = "result-images";
      grid.append(figure(previewUrl, "Original", "The image you chose"));
      if (method === "depth") {
        row.append(heading, grid, depthView(image.files.depth, urls["depth.grid"]));
        return row;
      }
      ["heatmap", "overlay", "grid"].forEach((kind) => {
        const url = urls[method + "." + kind];
        if (url) {
          grid.append(figure(url, KIND_NAMES[kind], (METHOD_NAMES[method] || method) + " " + kind));
        }
      });
      row.append(heading, grid);
      const score = (image.faithfulness || {})[method];
      if (score) row.append(trustScore(score));
      const compared = (image.compare || []).filter((c) => c.urls && c.urls[method + ".overlay"]);
      if (compared.length) row.append(compareView(method, compared));
      return row;
    });
  }

  // Every file: the image's own, then each compared class's (rank 2 on: rank 1's are the image's own).
  function runDownloads(image) {
    const urls = image.urls || {};
    const downloads = Object.keys(urls)
      .sort()
      .map((key) => ({ key: key, url: urls[key], note: "" }));
    (image.compare || []).slice(1).forEach((c) => {
      Object.keys(c.urls || {})
        .sort()
        .forEach((key) => downloads.push({ key: key, url: c.urls[key], note: " (" + c.rank + ". " + c.label + ")" }));
    });
    return downloads;
  }

  function downloadItem({ key, url, note }) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = url;
    a.download = url.split("/").pop();
    a.addEventListener("click", (event) => {
      if (!apiKey) return; // a plain link works without keys
      event.preventDefault();
      blobUrl(url).then(
        (saved) => {
          const save = document.createElement("a");
          save.href = saved;
          save.download = a.download;
          save.click();
          setTimeout(() => URL.revokeObjectURL(saved), 60000);
        },
        () => showError("Could not download " + a.download + ".")
      );
    });
    const [method, kind, layer] = key.split(".");
    const what = method === "depth" && kind === "grid" ? KIND_NAMES.depth : KIND_NAMES[kind] || kind;
    a.textContent = (METHOD_NAMES[method] || method) + " — " + what + (layer ? " (" + layer + ")" : "") + note;
    li.append(a);
    return li;
  }

  // depth: one PNG, a row per stage (stem, layer1 … layer4), each with its strongest channels.
  function depthView(files, url) {
    const box = document.createElement("div");
    box.className = "depth";
    const fig = figure(url, KIND_NAMES.depth, "The strongest feature maps of each stage, stem to layer4");
    fig.classList.add("depth-figure");
    const how = document.createElement("p");
    how.className = "small muted";
    const stages = ((files && files.stages) || []).map((s) => s.label + " " + s.shape.slice(1).join("×"));
    how.textContent =
      "Each row is one stage of the network, from the stem (fine, close to the pixels) to the last stage " +
      "(coarse, close to the decision): " + stages.join(", ") + ". Each tile is one of that stage's " +
      (files && files.stages && files.stages[0] ? files.stages[0].shape[0] : "") +
      " strongest channels, enlarged without smoothing so every cell of the feature map stays visible.";
    box.append(fig, how);
    return box;
  }

  // compare_top: one method's overlays for each of the image's most probable classes, side by
  // side, each headed by its class and probability, so "why this class and not that one?"
  // is answered by looking.
  function compareView(method, compared) {
    const box = document.createElement("section");
    box.className = "compare";
    box.dataset.method = method;
    const title = document.createElement("h4");
    title.textContent = "Why this class and not another? Its top " + compared.length + " classes";
    const maps = document.createElement("div");
    maps.className = "compare-maps";
    compared.forEach((c) => {
      const item = document.createElement("div");
      item.className = "compare-class";
      item.dataset.rank = String(c.rank);
      const head = document.createElement("h5");
      head.className = "compare-label";
      head.textContent = c.label + " · " + percent(c.probability);
      const fig = figure(
        c.urls[method + ".overlay"],
        "Overlay",
        (METHOD_NAMES[method] || method) + " for " + c.label
      );
      item.append(head, fig);
      maps.append(item);
    });
    box.append(title, maps);
    return box;
  }

  // Deletion / insertion AUCs of one map beside the random-order baseline, and how to read them.
  function trustScore(score) {
    const box = document.createElement("p");
    box.className = "faithfulness small";
    const fmt = (v) => v.toFixed(3);
    const better = score.deletion_auc < score.random_deletion_auc && score.insertion_auc > score.random_insertion_auc;
    box.textContent =
      "Trust score: deletion AUC " + fmt(score.deletion_auc) + " (random " + fmt(score.random_deletion_auc) +
      "), insertion AUC " + fmt(score.insertion_auc) + " (random " + fmt(score.random_insertion_auc) + "); " +
      score.steps + " steps, removed pixels take the image's " + (score.baseline === "mean" ? "mean colour" : score.baseline + " baseline") +
      ". " + (better ? "This map beats random pixels on both curves. " : "This map does not beat random pixels on both curves. ") +
      "How to read it: a lower deletion AUC than random means removing what the map points at destroys the " +
      "prediction faster than removing random pixels; a higher insertion AUC than random means revealing it restores the prediction sooner.";
    return box;
  }

  function figure(src, caption, alt) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = alt;
    img.loading = "eager";
    const broken = () => {
      fig.classList.add("broken");
      showError("Could not load " + caption.toLowerCase() + " from " + src + ".");
    };
    img.addEventListener("error", broken);
    if (src.startsWith("blob:")) {
      img.src = src;
    } else {
      blobUrl(src).then((url) => {
        img.src = url;
      }, broken);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.append(img, cap);
    return fig;
  }

  // --- small helpers ----------------------------------------------------------------------

  function capitalize(text) {
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  function percent(p) {
    return (p * 100).toFixed(p >= 0.1 ? 1 : 2) + "%";
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
})();
