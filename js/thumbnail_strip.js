// HeadSeg front end: the strip of mask thumbnails under a picker's picture (picker.js): one button per
// mask of the last run, the outline on the chosen one, and scrolling it into view. Only exports: ComfyUI
// loads every .js file here as an extension module.

import { el, fileUrl } from "./dom_helpers.js";
import { firstItem } from "./picker_pixels.js";

/** The mask pictures of UI payload ``output`` (the first item's, finest first); [] for none. */
export function maskRefs(output) {
  if (!output) return [];
  if (Array.isArray(output.headseg_masks)) return firstItem(output, "headseg_masks", "masks");
  if (!output.headseg_image && Array.isArray(output.images)) return output.images.slice(1);
  return [];
}

/** Fills strip element ``strip`` with a thumbnail button per mask of UI payload ``output``. The pointer
 * over one calls ``hover`` with its picture's URL (null when it leaves), a click calls ``choose`` with its
 * index. */
export function fillStrip(strip, output, hover, choose) {
  strip.replaceChildren();
  const info = Array.isArray(output?.headseg_mask_info) ? output.headseg_mask_info : [];
  maskRefs(output).forEach((ref, i) => {
    const url = fileUrl(ref);
    if (!url) return;
    const button = el("button", "headseg-thumb", strip);
    button.type = "button";
    button.dataset.index = String(i);
    const meta = info[i] ?? {};
    const details = [`mask ${i}`];
    if (Number.isFinite(meta.area)) details.push(`${meta.area} px`);
    if (Number.isFinite(meta.k)) details.push(`k=${meta.k}, cluster ${meta.cluster}`);
    button.title = `${details.join(" · ")} — click to output this mask`;
    button.setAttribute("aria-label", details.join(", ")); // else read as "mask 0 0" (alt + number)
    const img = el("img", null, button);
    img.alt = `mask ${i}`;
    img.addEventListener("load", () => revealChosen(strip), { once: true }); // widths come as they load
    img.src = url;
    el("span", null, button).textContent = String(i);
    button.addEventListener("pointerenter", () => hover(url));
    button.addEventListener("pointerleave", () => hover(null));
    button.addEventListener("click", (e) => {
      e.preventDefault();
      e.stopPropagation();
      choose(i);
    });
  });
}

/** Outlines the thumbnail of mask ``index`` in ``strip`` (an index past the last mask: the last, which the
 * node outputs), fades the strip when ``stale`` and marks its buttons disabled when ``stale`` or
 * ``indexLinked`` -> the index of the thumbnail outlined. */
export function markChosen(strip, index, stale, indexLinked) {
  strip.classList.toggle("headseg-stale", stale);
  const n = strip.children.length;
  const chosen = n ? Math.min(index, n - 1) : index; // an index past the last mask outputs the coarsest
  for (const b of strip.children) {
    const selected = Number(b.dataset.index) === chosen;
    b.classList.toggle("headseg-selected", selected);
    // the outline and the faded strip say so to the eye only
    b.setAttribute("aria-pressed", String(selected));
    // a click is ignored until the next run, or for good while a link feeds index
    b.setAttribute("aria-disabled", String(stale || indexLinked));
  }
  return chosen;
}

/** Scrolls ``strip`` just enough to show the outlined thumbnail: a run rebuilds the strip with new
 * pictures, which starts it at the first thumbnail again, so a coarser mask chosen further along was
 * out of view. A thumbnail in view leaves the strip where it is. */
export function revealChosen(strip) {
  const b = strip.querySelector(".headseg-thumb.headseg-selected");
  if (!b) return;
  const left = b.offsetLeft; // the strip is the thumbnails' offsetParent (styles.js)
  const right = left + b.offsetWidth;
  if (left < strip.scrollLeft) strip.scrollLeft = left;
  else if (right > strip.scrollLeft + strip.clientWidth) strip.scrollLeft = right - strip.clientWidth;
}

/** Wheel event ``e`` over ``strip`` scrolls it sideways. A mouse wheel turns vertically, and the browser
 * does not scroll a strip that only scrolls sideways for that: the thumbnails past the node's width could
 * not be reached. A sideways turn (trackpad, shift + wheel) and a pinch (ctrl) are left to the browser. */
export function scrollStrip(strip, e) {
  if (e.ctrlKey || Math.abs(e.deltaX) >= Math.abs(e.deltaY)) return;
  if (strip.scrollWidth <= strip.clientWidth) return;
  e.preventDefault();
  e.stopPropagation();
  const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? strip.clientWidth : 1; // lines, pages
  strip.scrollLeft += e.deltaY * unit;
}
