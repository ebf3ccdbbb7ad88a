// actindex atlas: sorting and the unit search box of layer pages. Everything else works without this file;
// the controls it drives stay hidden when JavaScript is off.
"use strict";
(function () {
  const tiles = document.getElementById("tiles");
  const controls = document.querySelector(".controls");
  if (!tiles || !controls) return;
  const sort = document.getElementById("sort");
  const find = document.getElementById("find");
  const shown = document.getElementById("shown");
  const all = Array.from(tiles.children);
  controls.hidden = false;

  function value(tile, key) {
    const v = parseFloat(tile.dataset[key]);
    return Number.isNaN(v) ? -Infinity : v;
  }
  function order() {
    const key = sort.value;
    const sorted = all.slice().sort(function (a, b) {
      if (key === "unit") return value(a, "unit") - value(b, "unit");
      return value(b, key) - value(a, key) || value(a, "unit") - value(b, "unit");
    });
    for (const tile of sorted) tiles.appendChild(tile);
  }
  function filter() {
    const wanted = find.value.trim();
    let count = 0;
    for (const tile of all) {
      const match = wanted === "" || tile.dataset.unit.startsWith(wanted);
      tile.hidden = !match;
      if (match) count += 1;
    }
    shown.textContent = wanted === "" ? "" : count + " of " + all.length;
  }
  sort.addEventListener("change", order);
  find.addEventListener("input", filter);
  find.addEventListener("keydown", function (event) {
    if (event.key !== "Enter") return;
    const exact = all.find(function (tile) { return tile.dataset.unit === find.value.trim(); });
    if (exact && exact.href) window.location.href = exact.href;
  });
})();
