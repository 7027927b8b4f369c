// HeadSeg front end: the set of pickers (picker.js) on the graph, and the slow timer that keeps them
// in step. Only exports: ComfyUI loads every .js file here as an extension module.

// Pickers on the graph. Besides the canvas draw callback, a slow timer keeps them in step with
// their widgets and upstream previews when the canvas does not draw the node (e.g. Vue nodes).
// A picker joins when its node is added to a graph (onAdded), not when the node is built: LiteGraph
// builds a throwaway copy of a node to copy, clone or alt-drag it (node.clone()) that never joins a
// graph and would otherwise stay here, with the timer, for good.
const LIVE_PICKERS = new Set();
let liveTimer = null;

/** Adds ``picker`` to the live pickers (``on``) or takes it out; starts the timer with the first
 * and stops it with the last. */
export function trackPicker(picker, on) {
  if (on) LIVE_PICKERS.add(picker);
  else LIVE_PICKERS.delete(picker);
  if (LIVE_PICKERS.size && liveTimer === null) {
    liveTimer = setInterval(() => {
      for (const p of LIVE_PICKERS) if (!p.dropIfGone()) p.tick();
    }, 500);
  } else if (!LIVE_PICKERS.size && liveTimer !== null) {
    clearInterval(liveTimer);
    liveTimer = null;
  }
}

/** The live pickers, as an array. */
export function livePickers() {
  return [...LIVE_PICKERS];
}
