// desanet console: live numbers without reloading. Every element with data-live="link.down"
// or data-live-row="<id>" data-live-key="down" is refreshed from /api/live, which returns
// them already formatted in the page's language. No library: a fetch every few seconds.
(function () {
  "use strict";
  var body = document.body;
  var url = body.dataset.liveUrl;
  var period = parseInt(body.dataset.liveMs || "2000", 10);
  function ids() {
    var seen = {};
    document.querySelectorAll("[data-live-row]").forEach(function (el) { seen[el.dataset.liveRow] = true; });
    return Object.keys(seen);
  }
  function set(el, value) {
    if (value === undefined || value === null) { return; }
    if (el.tagName === "METER") { el.value = value; } else { el.textContent = value; }
  }
  function apply(data) {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var path = el.dataset.live.split(".");
      var value = path.length === 2 ? (data[path[0]] || {})[path[1]] : data[path[0]];
      set(el, value);
    });
    document.querySelectorAll("[data-live-row]").forEach(function (el) {
      var row = (data.rows || {})[el.dataset.liveRow];
      if (row) { set(el, row[el.dataset.liveKey]); }
    });
    body.classList.toggle("stale", !data.ok);
  }
  function poll() {
    var wanted = ids();
    var query = wanted.length ? "?ids=" + encodeURIComponent(wanted.join(",")) : "";
    fetch(url + query, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { apply(data); } })
      .catch(function () { body.classList.add("stale"); })
      .finally(function () { window.setTimeout(poll, period); });
  }
  if (url && (document.querySelector("[data-live]") || document.querySelector("[data-live-row]"))) {
    window.setTimeout(poll, period);
  }
})();
