// crossdiff report: sortable and filterable tables. Plain JS, no dependencies, works from file://.
// A table with class "sortable" sorts on a header click (or Enter); th[data-type="num"] columns sort
// numerically by each cell's data-v attribute (else its text). Empty or NaN values always sort last.
(function () {
  "use strict";

  function key(td, numeric) {
    var raw = td.hasAttribute("data-v") ? td.getAttribute("data-v") : td.textContent.trim();
    if (!numeric) return raw === "" ? null : raw.toLowerCase();
    var v = parseFloat(raw);
    return isNaN(v) ? null : v;
  }

  function sortBy(table, col, dir) {
    var th = table.tHead.rows[0].cells[col];
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (tr, i) {
      return { tr: tr, k: key(tr.cells[col], numeric), i: i };
    });
    rows.sort(function (a, b) {
      if (a.k === null || b.k === null) return a.k === b.k ? a.i - b.i : a.k === null ? 1 : -1;
      if (a.k < b.k) return -dir;
      if (a.k > b.k) return dir;
      return a.i - b.i;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r.tr); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  }

  function makeSortable(table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = th.title || "click to sort";
      function go() {
        // First click: numbers descending (largest first), text ascending; then toggle.
        var cur = th.getAttribute("aria-sort");
        var dir = cur ? (cur === "ascending" ? -1 : 1) : th.getAttribute("data-type") === "num" ? -1 : 1;
        sortBy(table, col, dir);
      }
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") go(); });
    });
  }

  function makeFilter(input) {
    var table = document.getElementById(input.getAttribute("data-filter"));
    var count = document.getElementById(input.getAttribute("data-count"));
    input.addEventListener("input", function () {
      var q = input.value.trim().toLowerCase();
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (tr) {
        var hit = !q || tr.textContent.toLowerCase().indexOf(q) >= 0;
        tr.style.display = hit ? "" : "none";
        if (hit) shown += 1;
      });
      if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length + " shown";
    });
  }

  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("input[data-filter]").forEach(makeFilter);
})();
