// HeadSeg front end: what a picker (picker.js) shows of the pixels its node's widgets ask for: the cross on
// the chosen pixel, a ring on each more_points pixel, and the text of the info line under the picture. Only
// exports: ComfyUI loads every .js file here as an extension module.

import { el, fileUrl } from "./dom_helpers.js";
import { currentPixel, currentPoints, firstItem, isStale, MAX_POINTS } from "./picker_pixels.js";
import { maskRefs } from "./thumbnail_strip.js";

/** Puts ``marker`` (the cross) on pixel ``p`` ({x, y}) of the grid ``size`` [W, H] it is laid over; hidden for
 * no pixel, no grid, or a pixel outside it. */
export function placeMarker(marker, p, size) {
  if (!p || !size || p.x < 0 || p.y < 0 || p.x >= size[0] || p.y >= size[1]) {
    marker.style.display = "none";
    return;
  }
  marker.style.display = "block";
  marker.style.left = `${((p.x + 0.5) / size[0]) * 100}%`;
  marker.style.top = `${((p.y + 0.5) / size[1]) * 100}%`;
}

/** Fills ``rings`` (laid over the grid ``size`` [W, H]) with a ring on each more_points pixel of ``node``
 * (weighed against its last run, UI payload ``output``) inside the grid: green = in the masks, red = not. Of
 * a text listing more pixels than the node takes, the first MAX_POINTS (the info line says so). */
export function drawRings(rings, node, output, size) {
  const inside = (q) => size && q.x >= 0 && q.y >= 0 && q.x < size[0] && q.y < size[1];
  const points = currentPoints(node, output).slice(0, MAX_POINTS).filter(inside);
  rings.replaceChildren();
  for (const q of points) {
    const ring = el("div", q.keep ? "headseg-ring" : "headseg-ring headseg-ring-out", rings);
    ring.style.left = `${((q.x + 0.5) / size[0]) * 100}%`;
    ring.style.top = `${((q.y + 0.5) / size[1]) * 100}%`;
    ring.title = `${q.keep ? "in" : "not in"} the masks: ${q.x}, ${q.y}`;
  }
}

/** The info line of the picker of ``node`` (last run: UI payload ``output``; ``size``: the grid [W, H] the
 * widgets refer to, null for none; ``src``: the picture shown, null for none): the pixel and more_points
 * asked for, the grid, and the masks here or what to do to see them. */
export function infoText(node, output, size, src) {
  const p = currentPixel(node, output);
  const parts = [];
  if (p) parts.push(`x ${p.x}, y ${p.y}`);
  const points = currentPoints(node, output);
  const kept = points.filter((q) => q.keep).length;
  if (kept) parts.push(`+${kept} in`);
  if (points.length > kept) parts.push(`${points.length - kept} out`);
  if (points.length > MAX_POINTS) {
    parts.push(`more_points: ${points.length} pixels, the node takes at most ${MAX_POINTS} (rings on the first)`);
  }
  if (size) parts.push(`${size[0]}×${size[1]}`);
  const n = maskRefs(output).filter((ref) => fileUrl(ref)).length;
  if (n) {
    parts.push(`${n} mask${n === 1 ? "" : "s"} here`);
    if (isStale(node, output)) parts.push("queue to update the masks");
  } else if (output && Array.isArray(output.headseg_masks) && !isStale(node, output)) {
    // with more_points, the masks at the pixel may all have been left out by them
    const ran = firstItem(output, "headseg_points", "points");
    parts.push(Array.isArray(ran) && ran.length ? "no mask fits these pixels" : "no mask contains this pixel");
  } else if (src) {
    parts.push(isStale(node, output) ? "queue to see the masks here" : "click the picture to pick a pixel");
  }
  return parts.join(" · ");
}
