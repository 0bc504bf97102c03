// Berth dashboard: live updates over Server-Sent Events, bulk selection and
// confirmations. No framework; the pages work without it, only less live.
(function () {
  "use strict";

  // A path of keys joined by "/": queue names have dots ("berth.spawn").
  function dig(obj, path) {
    return path.split("/").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  // Swaps a live table body for a fresh one, keeping the boxes an operator ticked.
  function refreshRows() {
    var body = document.querySelector("tbody[data-live]");
    if (!body) return;
    var ticked = {};
    body.querySelectorAll("input[type=checkbox]:checked").forEach(function (c) { ticked[c.value] = true; });
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "rows");
    url.searchParams.delete("notice");
    url.searchParams.delete("error");
    fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (r.ok) return r.text();
      throw new Error(r.status);
    }).then(function (html) {
      body.innerHTML = html;
      body.querySelectorAll("input[type=checkbox]").forEach(function (c) { if (ticked[c.value]) c.checked = true; });
    }).catch(function () { /* the next change tries again */ });
  }

  function live() {
    var dot = document.getElementById("live");
    if (!window.EventSource || !dot) return;
    var source = new EventSource("/admin/events");
    var first = true;
    source.addEventListener("snapshot", function (e) {
      var snap = JSON.parse(e.data);
      dot.className = "live on";
      document.querySelectorAll("[data-stat]").forEach(function (el) {
        var v = dig(snap, el.getAttribute("data-stat"));
        el.textContent = v == null ? "0" : String(v);
      });
      if (!first) refreshRows();
      first = false;
    });
    source.onerror = function () { dot.className = "live off"; };
    // A page left (or kept in the back-forward cache) gives its stream back:
    // browsers allow six connections to a host, and streams of pages gone by
    // held them, so that after a few pages a click waited for a minute.
    window.addEventListener("pagehide", function () { source.close(); });
    window.addEventListener("pageshow", function (e) { if (e.persisted) window.location.reload(); });
  }

  function selection() {
    var all = document.querySelector("[data-select-all]");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("tbody input[name=ids]").forEach(function (c) { c.checked = all.checked; });
      });
    }
    document.querySelectorAll("[data-confirm]").forEach(function (el) {
      var ask = function (e) { if (!window.confirm(el.getAttribute("data-confirm"))) e.preventDefault(); };
      el.addEventListener(el.tagName === "FORM" ? "submit" : "click", ask);
    });
  }

  document.addEventListener("DOMContentLoaded", function () { live(); selection(); });
})();
