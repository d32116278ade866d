(() => {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const EAGER = 48;   // first cards load at once; the rest lazily, for big collections
  const PAGE = 600;   // cards per "Show more" step, to keep huge reports responsive
  const $ = (id) => document.getElementById(id);
  const state = { prompt: "", status: "all", sort: "name", q: "" };
  let limit = PAGE;
  let shown = [];
  let current = -1;
  let view = 0;

  // Every piece of data goes through textContent / setAttribute: never innerHTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const pct = (v) => (v === null ? "–" : (100 * v).toFixed(v > 0 && v < 0.001 ? 3 : 1) + "%");
  const num = (v) => (v === null ? "–" : v.toFixed(3));
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  function activeStats(item) {
    if (!item.prompts.length) return null;
    if (state.prompt) return item.prompts.find((p) => p.prompt === state.prompt) || null;
    return item.prompts[0];
  }
  // With all prompts, an image counts as its best prompt (the one most worth a look).
  function metric(item, field) {
    if (state.prompt) {
      const p = activeStats(item);
      return p ? p[field] : null;
    }
    const values = item.prompts.map((p) => p[field]).filter((v) => v !== null);
    return values.length ? Math.max(...values) : null;
  }
  function isEmpty(item) {
    if (item.status !== "ok") return false;
    if (state.prompt) { const p = activeStats(item); return !!(p && p.empty); }
    return item.prompts.some((p) => p.empty);
  }
  function matches(item) {
    // Failed rows have no stats; they failed for every prompt, so every prompt shows them.
    if (state.prompt && item.prompts.length && !activeStats(item)) return false;
    if (state.status === "empty" && !isEmpty(item)) return false;
    if (["ok", "failed", "skipped"].includes(state.status) && item.status !== state.status) {
      return false;
    }
    if (state.q && !item.key.toLowerCase().includes(state.q.toLowerCase())) return false;
    return true;
  }
  function compare(a, b) {
    const [field, dir] = state.sort.split("-");
    if (field === "coverage" || field === "max") {
      const va = metric(a, field), vb = metric(b, field);
      // Images without numbers (failures) go last whichever the direction.
      if (va === null || vb === null) {
        if (va !== vb) return va === null ? 1 : -1;
      } else if (va !== vb) {
        return dir === "asc" ? va - vb : vb - va;
      }
    }
    return collator.compare(a.key, b.key) || a.id - b.id;
  }

  // -- URL state: #prompt=..&status=..&sort=..&q=.. so views can be bookmarked and scripted ----
  function readHash() {
    const raw = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    const params = new URLSearchParams(raw);
    const prompt = params.get("prompt") || "";
    state.prompt = DATA.prompts.includes(prompt) ? prompt : "";
    const status = params.get("status") || "all";
    state.status = ["all", "ok", "failed", "empty", "skipped"].includes(status) ? status : "all";
    const sort = params.get("sort") || "name";
    state.sort = ["name", "coverage-asc", "coverage-desc", "max-asc", "max-desc"]
      .includes(sort) ? sort : "name";
    state.q = params.get("q") || "";
    $("f-prompt").value = state.prompt;
    $("f-status").value = state.status;
    $("f-sort").value = state.sort;
    $("f-q").value = state.q;
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.prompt) params.set("prompt", state.prompt);
    if (state.status !== "all") params.set("status", state.status);
    if (state.sort !== "name") params.set("sort", state.sort);
    if (state.q) params.set("q", state.q);
    const hash = params.toString();
    if (hash !== location.hash.slice(1)) {
      // replace: filtering should not fill the back button's history.
      location.replace("#" + hash);
    }
  }

  // -- cards -----------------------------------------------------------------------------------
  function image(src, alt, eager, holder) {
    const img = el("img", { alt, decoding: "async", loading: eager ? "eager" : "lazy" });
    // State in the DOM: readable by tests and by anyone debugging a broken report.
    img.addEventListener("load", () => {
      img.dataset.loaded = "true";
      holder.dataset.loaded = "true";
    });
    img.addEventListener("error", () => {
      img.dataset.broken = "true";
      holder.dataset.broken = "true";
      img.replaceWith(el("span", { class: "placeholder" }, "image missing"));
    });
    img.src = src;
    return img;
  }
  function statsTable(item, active) {
    const body = item.prompts.map((p) =>
      el("tr", { class: p === active ? "active" : null },
        el("th", { scope: "row" }, p.prompt),
        el("td", { class: "num", title: "coverage" }, pct(p.coverage)),
        el("td", { class: "num", title: "max probability" }, num(p.max)),
        el("td", null, p.empty ? el("span", { class: "badge empty" }, "empty") : "")));
    return el("table", { class: "stats" },
      el("thead", null, el("tr", null, el("th", null, "prompt"),
        el("th", { class: "c-num", title: "share of pixels above the threshold" }, "cover"),
        el("th", { class: "c-num", title: "highest probability" }, "max"),
        el("th", { class: "c-flag" }, ""))),
      el("tbody", null, ...body));
  }
  function badges(item) {
    return el("div", { class: "badges" },
      el("span", { class: "badge " + item.status }, item.status),
      isEmpty(item) ? el("span", { class: "badge empty" }, "empty") : null,
      item.resumed ? el("span", { class: "badge resumed", title: "unchanged since run " +
        (item.run || "?") }, "from earlier run") : null);
  }
  function card(item, position) {
    const active = activeStats(item);
    const li = el("li", {
      class: "card", "data-id": item.id, "data-key": item.key, "data-status": item.status,
      "data-empty": isEmpty(item) ? "true" : "false",
      "data-prompt": active ? active.prompt : null,
      "data-coverage": active && active.coverage !== null ? active.coverage : null,
      "data-max": active && active.max !== null ? active.max : null,
    });
    const button = el("button", { type: "button", class: "thumb",
      "aria-label": "Open " + item.key });
    if (active && active.thumb) {
      li.dataset.thumb = "true";
      button.append(image(active.thumb, item.key, position < EAGER, li));
    } else {
      button.append(el("span", { class: "placeholder" },
        item.status === "ok" ? "no preview" : item.status));
    }
    button.addEventListener("click", () => openBox(position));
    li.append(button, el("div", { class: "meta" },
      el("p", { class: "key", title: item.input || item.key }, item.key),
      badges(item),
      item.prompts.length ? statsTable(item, active) : null,
      item.error ? el("p", { class: "error" }, item.error) : null));
    return li;
  }

  function render() {
    shown = DATA.items.filter(matches).sort(compare);
    const grid = $("grid");
    const cards = shown.slice(0, limit).map(card);
    grid.replaceChildren(...cards);
    $("more").hidden = shown.length <= limit;
    $("empty-note").hidden = shown.length > 0;
    $("count").textContent = shown.length + " of " + DATA.items.length + " shown";
    grid.dataset.visible = String(cards.length);
    document.body.dataset.ready = "true";
  }
  function update() { limit = PAGE; writeHash(); render(); }

  // -- lightbox --------------------------------------------------------------------------------
  function openBox(position) {
    current = position;
    view = 0;
    fillBox();
    const box = $("lightbox");
    if (!box.open) box.showModal();
  }
  function fillBox() {
    const item = shown[current];
    const active = activeStats(item);
    const views = active ? active.views : (item.inputHref ? [{ kind: "input",
      href: item.inputHref }] : []);
    $("lb-title").textContent = item.key + "  (" + (current + 1) + " / " + shown.length + ")";
    const buttons = views.map((v, i) => {
      const b = el("button", { type: "button", "aria-pressed": i === view ? "true" : "false" },
        v.kind);
      b.addEventListener("click", () => { view = i; fillBox(); });
      return b;
    });
    $("lb-views").replaceChildren(...buttons);
    const img = $("lb-img");
    $("lb-note").textContent = "";
    if (views.length) {
      img.hidden = false;
      img.alt = item.key + " " + views[view].kind;
      img.onerror = () => { img.hidden = true;
        $("lb-note").textContent = "This file cannot be shown (moved, or a format the " +
          "browser does not display)."; };
      img.src = views[view].href;
    } else {
      img.hidden = true;
      img.removeAttribute("src");
      $("lb-note").textContent = "No image for this result.";
    }
    const links = (active ? active.links : []).map((l) =>
      el("a", { href: l.href, target: "_blank", rel: "noopener" }, l.kind));
    if (item.inputHref) {
      links.push(el("a", { href: item.inputHref, target: "_blank", rel: "noopener" }, "input"));
    }
    // replaceChildren would print a null as "null": drop the parts this item lacks.
    const parts = [
      badges(item),
      item.width ? el("p", null, item.width + " × " + item.height + " px" +
        (item.run ? " · run " + item.run : "")) : null,
      item.prompts.length ? statsTable(item, active) : null,
      item.error ? el("p", { class: "error" }, item.error) : null,
      links.length ? el("p", null, "Open: ", ...links) : null,
    ];
    $("lb-body").replaceChildren(...parts.filter((part) => part !== null));
  }
  function step(delta) {
    if (!shown.length) return;
    current = (current + delta + shown.length) % shown.length;
    view = 0;
    fillBox();
  }

  // -- wiring ----------------------------------------------------------------------------------
  function init() {
    document.title = DATA.title;
    for (const prompt of DATA.prompts) $("f-prompt").append(el("option", { value: prompt },
      prompt));
    const count = (pred) => DATA.items.filter(pred).length;
    const parts = [DATA.items.length + " images",
      count((i) => i.status === "ok") + " ok",
      count((i) => i.status === "failed") + " failed",
      count((i) => i.status === "ok" && i.prompts.some((p) => p.empty)) + " with an empty prompt",
      DATA.prompts.length + " prompts"];
    const resumed = count((i) => i.resumed);
    if (resumed) parts.push(resumed + " unchanged from earlier runs");
    if (count((i) => i.status === "skipped")) parts.push(count((i) => i.status === "skipped") +
      " skipped without an earlier result");
    if (DATA.badLines) parts.push(DATA.badLines + " unreadable log lines ignored");
    $("summary").textContent = parts.join(" · ") + " — generated " + DATA.generated;
    const s = DATA.summary;
    if (s) {
      const c = Object.entries(s.counts).map(([k, v]) => v + " " + k.replaceAll("_", " "));
      $("last-run").textContent = "Last run " + (s.run || "?") + ": " + c.join(", ") +
        (s.seconds !== null ? " in " + s.seconds.toFixed(1) + " s" : "") +
        (s.interrupted ? " (interrupted)" : "");
    }
    $("controls").addEventListener("submit", (e) => e.preventDefault());
    $("f-prompt").addEventListener("change", (e) => { state.prompt = e.target.value; update(); });
    $("f-status").addEventListener("change", (e) => { state.status = e.target.value; update(); });
    $("f-sort").addEventListener("change", (e) => { state.sort = e.target.value; update(); });
    $("f-q").addEventListener("input", (e) => { state.q = e.target.value; update(); });
    $("more").addEventListener("click", () => { limit += PAGE; render(); });
    window.addEventListener("hashchange", () => { readHash(); render(); });
    $("lb-prev").addEventListener("click", () => step(-1));
    $("lb-next").addEventListener("click", () => step(1));
    $("lb-close").addEventListener("click", () => $("lightbox").close());
    $("lightbox").addEventListener("close", () => {
      // Back to the card that opened it, so keyboard users keep their place.
      const button = document.querySelectorAll("#grid .thumb")[current];
      if (button) button.focus();
    });
    $("lightbox").addEventListener("click", (e) => {
      if (e.target === $("lightbox")) $("lightbox").close();  // click on the backdrop
    });
    document.addEventListener("keydown", (e) => {
      if ($("lightbox").open) {
        if (e.key === "ArrowLeft") { step(-1); e.preventDefault(); }
        if (e.key === "ArrowRight") { step(1); e.preventDefault(); }
      } else if (e.key === "/" && document.activeElement !== $("f-q")) {
        $("f-q").focus();
        e.preventDefault();
      }
    });
    readHash();
    render();
    // #open=<key> opens that image's lightbox: a shareable link to one result.
    const hash = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    const open = new URLSearchParams(hash).get("open");
    const position = open === null ? -1 : shown.findIndex((item) => item.key === open);
    if (position >= 0) openBox(position);
  }
  init();
})();
