// HeadSeg front end: the changes the pack makes to the graph by itself after a run (a node grown to show its
// note line, the frame a run leaves in Mask Select's properties), noted in ComfyUI's undo history without
// an undo step of their own. Only exports: ComfyUI loads every .js file here as an extension module.

import { app } from "../../scripts/app.js";
import { inWorkflow, noteGraphState, notesGraphState } from "./graph_helpers.js";

// Nodes changed by the pack whose change is not noted yet (noteOwnChange).
const PENDING = new Set();
// While ComfyUI rebuilds the graph (undo, redo) or a change of the user's is under way, the noting waits:
// tried again every RETRY_MS, at most RETRIES times. While it loads a graph (graphLoading) it waits as long as
// the load lasts: a change tracker notes nothing then.
const RETRY_MS = 50;
const RETRIES = 100;
let retryTimer = null;

/**
 * Notes a change the pack made to ``node`` by itself, not an edit of the user's: its size (grown to show the
 * note line after a run, or again after undo rebuilt it) and its properties' headseg_frame (picker_pixels.js
 * rememberFrame). The change joins the open workflow's current undo step instead of making a step of its
 * own. As a step of its own, Ctrl+Z after the first run changed nothing on screen (the frame is not shown;
 * the nodes rebuilt by the undo grew again for their note lines), and that growth was the next step at the
 * user's next click, which cleared the redo history: the edits before the first run could not be undone.
 * The workflow is marked modified and kept for a page reload as with any change ComfyUI notes. When the
 * graph holds other changes not noted yet (e.g. the pixels a run mapped into the widgets), they and this one
 * are noted together, as one step.
 */
export function noteOwnChange(node) {
  if (node) PENDING.add(node);
  foldPending(RETRIES);
}

function foldPending(retries) {
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  if (!notesGraphState(tracker)) {
    PENDING.clear();
    return;
  }
  const loading = graphLoading(tracker);
  if (loading || tracker._restoringState || tracker.changeCount) {
    if (retries > 0 && retryTimer === null) {
      retryTimer = setTimeout(() => {
        retryTimer = null;
        foldPending(loading ? retries : retries - 1);
      }, RETRY_MS);
    }
    return;
  }
  const nodes = [...PENDING].filter((n) => inWorkflow(n));
  PENDING.clear();
  const kept = tracker.activeState;
  const graphEqual = tracker.constructor?.graphEqual;
  if (!kept || typeof graphEqual !== "function" || !app.graph) {
    noteGraphState(tracker);
    return;
  }
  const now = JSON.parse(JSON.stringify(app.graph.serialize()));
  if (graphEqual(kept, now)) return;
  if (!graphEqual(withOwnChanges(kept, now, nodes), now)) {
    noteGraphState(tracker); // the user's changes too: one step
    return;
  }
  tracker.activeState = now;
  tracker.updateModified?.(); // the modified mark, and ComfyUI's copy for a page reload (its graphChanged)
}

/** Whether ComfyUI is loading a graph (opening a workflow tab, until every extension's afterLoadGraph is done):
 * 1.58's change trackers note nothing then (their class's isLoadingGraph; the app's isGraphReady is false before
 * the first graph), and the noting (graphEqual, captureCanvasState) waits for the load to end. False on a
 * frontend without those flags (1.32). */
function graphLoading(tracker) {
  return tracker.constructor?.isLoadingGraph === true || app.isGraphReady === false;
}

/** A copy of serialised graph ``kept`` with the size and frame of ``nodes`` as in serialised graph ``now``. */
function withOwnChanges(kept, now, nodes) {
  const out = JSON.parse(JSON.stringify(kept));
  for (const node of nodes) {
    const before = serialisedNode(out, node);
    const after = serialisedNode(now, node);
    if (!before || !after) continue;
    before.size = after.size;
    const frame = after.properties?.headseg_frame;
    if (frame !== undefined) (before.properties ??= {}).headseg_frame = frame;
    else if (before.properties) delete before.properties.headseg_frame;
  }
  return out;
}

/** The entry of ``node`` in serialised graph ``state``: among its nodes, or its subgraph's (definitions). */
function serialisedNode(state, node) {
  const graph = node.graph;
  const inSubgraph = graph && graph.isRootGraph === false;
  const nodes = inSubgraph ? state?.definitions?.subgraphs?.find((s) => s?.id === graph.id)?.nodes : state?.nodes;
  return Array.isArray(nodes) ? nodes.find((n) => String(n?.id) === String(node.id)) : undefined;
}
