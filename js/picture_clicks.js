// HeadSeg front end: what a click on a picker's picture (picker.js) does to its node's widgets: a plain
// click picks pixel x / y, a shift-click adds a pixel the masks must also contain to more_points and an
// alt-click one they must not contain (a click on a ring removes it). Only exports: ComfyUI loads every
// .js file here as an extension module.

import { isLinked, setWidget, widget } from "./graph_helpers.js";
import { pointsText, togglePoint } from "./picker_pixels.js";

/** Edits the widgets of ``node`` for a click on pixel ``p`` ({x, y}) of the grid ``size`` [W, H] with
 * ``shiftKey`` / ``altKey`` held (``keys``: the pointer event), its last run being UI payload ``output`` ->
 * null once edited, else the text saying why the click changes nothing (the widget comes from a link). */
export function clickPixel(node, output, p, size, keys) {
  if (keys.shiftKey || keys.altKey) {
    // a pixel the masks must also contain (shift) or must not contain (alt); on a ring: removed
    const points = widget(node, "more_points");
    if (!points || isLinked(node, "more_points")) {
      return "more_points comes from a link: shift / alt-clicks do not change it";
    }
    const text = pointsText(node, output); // the pixels the rings show
    setWidget(node, "more_points", togglePoint(text, p, !keys.altKey, size));
    return null;
  }
  if (isLinked(node, "x") || isLinked(node, "y")) return "x / y come from a link: clicks do not change them";
  setWidget(node, "x", p.x);
  setWidget(node, "y", p.y);
  // a plain click starts over: the pixels added by shift / alt-click went with the previous pick
  if (widget(node, "more_points")?.value && !isLinked(node, "more_points")) {
    setWidget(node, "more_points", "");
  }
  return null;
}
