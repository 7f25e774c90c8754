// Pumice site: progressive enhancement only. Every page reads fine without this file.
"use strict";
(function () {
  document.documentElement.classList.add("js");

  // Job lists: filter the rows shown by text (the filter pages work without JavaScript).
  var search = document.getElementById("job-search");
  if (search) {
    search.addEventListener("input", function () {
      var needle = search.value.toLowerCase();
      document.querySelectorAll("table[data-filterable] tbody tr").forEach(function (row) {
        row.hidden = needle !== "" && row.textContent.toLowerCase().indexOf(needle) < 0;
      });
    });
  }

  // Lab now: poll the tiny stamp the master rewrites with the page; when it changes, fetch the page
  // as a document (parsed by the browser, never an HTML string: Trusted Types) and swap it in.
  var lab = document.getElementById("lab-now");
  if (lab && window.fetch) {
    var stamp = lab.dataset.stamp;
    var next = stamp;
    var loading = false;
    var reload = function () {
      var request = new XMLHttpRequest();
      // a new URL each time: a page rewritten within the second it was read, at the same size, has
      // the same ETag and Last-Modified, and a revalidation would hand back the old one
      request.open("GET", "index.html?" + encodeURIComponent(next));
      request.responseType = "document";
      request.onloadend = function () {
        loading = false;
        var fresh = request.response && request.response.getElementById("lab-now");
        var current = document.getElementById("lab-now");
        if (!fresh || !current) { return; }
        current.replaceWith(document.adoptNode(fresh));
        stamp = fresh.dataset.stamp;
      };
      request.send();
    };
    window.setInterval(function () {
      if (loading || document.hidden) { return; }
      fetch("now.txt", { cache: "no-store" })  // never revalidated: see above
        .then(function (r) { return r.ok ? r.text() : ""; })
        .then(function (text) {
          text = text.trim();
          if (text && text !== stamp && !loading) { loading = true; next = text; reload(); }
        })
        .catch(function () { /* the master is publishing, or the site is read from files */ });
    }, 250);
  }

  var log = document.getElementById("log");
  if (!log) { return; }

  // Remember the level filters between pages and jobs.
  var boxes = document.querySelectorAll("form.levels input[type=checkbox]");
  boxes.forEach(function (box) {
    var key = "pumice." + box.id;
    try {
      var saved = window.localStorage.getItem(key);
      if (saved !== null) { box.checked = saved === "1"; }
    } catch (e) { /* storage disabled: filters still work for this page */ }
    box.addEventListener("change", function () {
      try { window.localStorage.setItem(key, box.checked ? "1" : "0"); } catch (e) { /* ignore */ }
    });
  });

  // #L123 of a line on another page of a long log: go to that page.
  var first = parseInt(log.dataset.first, 10) || 1;
  var pageLines = parseInt(log.dataset.pageLines, 10) || 1;
  var pages = parseInt(log.dataset.pages, 10) || 1;
  function followHash() {
    var match = /^#L(\d+)$/.exec(window.location.hash);
    if (!match) { return; }
    var line = parseInt(match[1], 10);
    if (document.getElementById("L" + line)) { return; }
    var page = Math.floor((line - 1) / pageLines) + 1;
    if (page >= 1 && page <= pages && (line < first || line >= first + pageLines)) {
      window.location.replace((page === 1 ? "log.html" : "log-" + page + ".html") + "#L" + line);
    }
  }
  followHash();
  window.addEventListener("hashchange", followHash);

  // Live tail of a running job: fetch what was appended to output.yaml since this page was made.
  if (log.dataset.live !== "1") { return; }
  var offset = parseInt(log.dataset.bytes, 10) || 0;
  var next = parseInt(log.dataset.next, 10) || 1;
  var pending = "";
  var levels = ["debug", "info", "warning", "error", "exception", "results", "target", "input", "feedback", "event"];
  var decoder = new TextDecoder("utf-8");
  function time(dt) { return typeof dt === "string" ? dt.slice(11, 19) : ""; }
  function text(msg) {
    if (typeof msg === "string") { return msg.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, ""); }
    return JSON.stringify(msg);
  }
  function append(line) {
    var record;
    try { record = JSON.parse(line.replace(/^- /, "")); } catch (e) { record = { dt: "", lvl: "error", msg: line }; }
    var row = document.createElement("div");
    row.id = "L" + next;
    row.className = levels.indexOf(record.lvl) >= 0 ? record.lvl : "info";
    var anchor = document.createElement("a");
    anchor.href = "#L" + next;
    anchor.textContent = String(next);
    var stamp = document.createElement("span");
    stamp.className = "t";
    stamp.textContent = time(record.dt);
    var message = document.createElement("span");
    message.className = "m";
    message.textContent = text(record.msg);  // textContent: board output is never parsed as HTML
    row.append(anchor, stamp, message);
    log.appendChild(row);
    next += 1;
    return record;
  }
  var finished = false;
  function poll() {
    if (finished) { return; }
    fetch("output.yaml", { headers: { Range: "bytes=" + offset + "-" }, cache: "no-store" })
      .then(function (response) {
        if (response.status === 416) { return null; }
        if (!response.ok) { throw new Error("cannot read output.yaml: " + response.status); }
        // 206 is the new part; a server without ranges sends the whole file (200): keep what is new
        var whole = response.status === 200;
        return response.arrayBuffer().then(function (buffer) { return whole ? buffer.slice(offset) : buffer; });
      })
      .then(function (buffer) {
        if (buffer && buffer.byteLength) {
          offset += buffer.byteLength;
          pending += decoder.decode(buffer, { stream: true });
          var lines = pending.split("\n");
          pending = lines.pop();
          var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
          lines.forEach(function (line) {
            if (!line) { return; }
            var record = append(line);
            if (record.lvl === "results" && record.msg && record.msg.definition === "lava" && record.msg.case === "job") {
              finished = true;
            }
          });
          if (atBottom) { window.scrollTo(0, document.body.scrollHeight); }
        }
        if (finished) {
          var note = document.getElementById("live-note");
          if (note) { note.textContent = "The job has finished: reload for its final pages."; }
          return;
        }
        window.setTimeout(poll, 2000);
      })
      .catch(function () { window.setTimeout(poll, 10000); });
  }
  window.setTimeout(poll, 1000);
})();
