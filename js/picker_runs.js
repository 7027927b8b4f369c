// HeadSeg front end: which run is whose, for the pickers (picker.js). The prompt under way and the nodes
// that ran in it, the upstream preview each picker showed when a prompt was queued and the workflow it was
// queued from, and for each run the upstream preview shown beside it and whether its pictures are gone.
// Kept by run, not by picker: undo and a workflow tab opened again rebuild the node, and the rebuilt picker
// gets the run back from the outputs ComfyUI keeps. Only exports: ComfyUI loads every .js file here as an
// extension module.

import { app } from "../../scripts/app.js";
import { fromOtherWorkflow, runKey } from "./graph_helpers.js";

// A run is known by its run id, else its UI payload's content (runKey), not by the payload object: newer
// frontends (1.58) keep a copy of each run's outputs, and hand out another copy after undo or a workflow tab
// opened again.
// Each run (key) -> the file the upstream node's preview showed beside it (upstream_preview.js previewFile;
// null until one is known). The last RUNS_KEPT runs are kept.
const RUN_UPSTREAM = new Map();
// Runs whose picture the server no longer has (it was restarted): not restored when the node is rebuilt.
const LOST_RUNS = new Map();
const RUNS_KEPT = 1000;

// Ids ("5", or "12:3" inside a subgraph) of the nodes whose 'executed' message came since the last
// execution_start: the nodes that ran, or were served from the cache, in the prompt under way.
const RAN = new Set();

// Prompt id -> {shown: picker -> the upstream preview file it showed when the prompt was queued (null:
// loading), workflow: the workflow open then}. A prompt can wait in the queue behind others: another picture
// chosen upstream meanwhile is not the one it segments; and ComfyUI hands its runs to the nodes of the
// workflow open when they end. In the order their ids came (Map order), each entry dropped when its prompt
// ends, and those noted before a prompt queued at the back when it starts (they ran before it, or were taken
// off the queue). Those past the last QUEUED_KEPT are dropped: more than one click's batch (ComfyUI's batch
// count goes to 100), as the first of them are the next to run.
const QUEUED_UPSTREAM = new Map();
const QUEUED_KEPT = 1000;
let promptUnderWay = null; // the id of the prompt under way (from its execution_start to its end)
// A run (key) -> the workflows its prompts were queued from (where known when it came): a prompt served from
// ComfyUI's cache hands over an earlier run again, the same content and headseg_run (e.g. a duplicate tab
// queued with nothing changed), and that run is then each of these workflows' run.
const RUN_WORKFLOW = new Map();

/** Notes ``value`` for run ``key`` in ``map`` (RUN_UPSTREAM, LOST_RUNS, RUN_WORKFLOW) as its newest entry; the
 * oldest go past RUNS_KEPT. */
function noteForRun(map, key, value) {
  if (key === null) return;
  map.delete(key);
  map.set(key, value);
  for (const old of map.keys()) {
    if (map.size <= RUNS_KEPT) break;
    map.delete(old);
  }
}

/** Follows a prompt's messages (hooked up in picker_node.js): which prompt is under way and which nodes
 * ran in it. */
export function noteRun(type, detail) {
  if (type === "executed") {
    for (const id of [detail?.node, detail?.display_node]) if (id != null) RAN.add(String(id));
    return;
  }
  if (promptUnderWay !== null) QUEUED_UPSTREAM.delete(promptUnderWay);
  promptUnderWay = null;
  if (type === "execution_start") {
    promptUnderWay = detail?.prompt_id == null ? null : String(detail.prompt_id);
    RAN.clear();
    if (QUEUED_UPSTREAM.get(promptUnderWay)?.back) {
      for (const id of QUEUED_UPSTREAM.keys()) {
        if (id === promptUnderWay) break;
        QUEUED_UPSTREAM.delete(id);
      }
    }
  }
}

/** The upstream preview files ``pickers`` show as a prompt is queued (picker_node.js: before it is sent). A
 * picker that cannot tell is left out (its run is matched as before, with the file shown at the start):
 * this runs inside ComfyUI's queueing, which must not fail for it. */
export function upstreamAtQueue(pickers) {
  const shown = new WeakMap();
  for (const picker of pickers) {
    try {
      shown.set(picker, picker.upstreamFileNow());
    } catch {
      // left out
    }
  }
  return shown;
}

/** Prompt ``promptId`` was queued from ``workflow`` with the upstream files ``shown`` (upstreamAtQueue), at
 * the back of the queue (``back``: not to the front, nor at a number of its own). */
export function noteQueued(promptId, shown, workflow, back = false) {
  if (promptId == null) return;
  QUEUED_UPSTREAM.set(String(promptId), { shown, workflow, back });
  for (const id of QUEUED_UPSTREAM.keys()) {
    if (QUEUED_UPSTREAM.size <= QUEUED_KEPT) break;
    QUEUED_UPSTREAM.delete(id);
  }
}

/** The upstream preview file ``picker`` showed when the prompt under way was queued (null: loading;
 * undefined where this picker did not see it queued). */
export function shownWhenQueued(picker) {
  return QUEUED_UPSTREAM.get(promptUnderWay)?.shown.get(picker);
}

/** Whether the node of id ``id`` (executionId or outputKey) ran in the prompt under way. */
export function ranInPrompt(id) {
  return RAN.has(id);
}

/** Whether UI payload ``output`` is a run of a prompt queued from another workflow than the open one.
 * Known for the run of the prompt under way as its 'executed' message comes (``fromMessage``), from the
 * workflow open when that prompt was queued (each such workflow's, for a run served again from the cache), and
 * kept for the payload (which ComfyUI gives back to a node
 * rebuilt by undo); else from the change trackers (graph_helpers.js fromOtherWorkflow). */
export function otherWorkflowsRun(output, fromMessage) {
  const key = runKey(output);
  const queuedFrom = fromMessage ? QUEUED_UPSTREAM.get(promptUnderWay)?.workflow : null;
  if (queuedFrom) noteForRun(RUN_WORKFLOW, key, new Set(RUN_WORKFLOW.get(key)).add(queuedFrom));
  const workflows = RUN_WORKFLOW.get(key);
  const open = app.extensionManager?.workflow?.activeWorkflow;
  if (workflows && open) return !workflows.has(open);
  return fromOtherWorkflow(output);
}

/** Whether the run of UI payload ``output`` reached a picker (its upstream file is noted, maybe as null). */
export function knownRun(output) {
  return RUN_UPSTREAM.has(runKey(output));
}

/** The upstream preview file shown beside the run of UI payload ``output`` (null: not known). */
export function runUpstream(output) {
  return RUN_UPSTREAM.get(runKey(output)) ?? null;
}

/** Notes ``file`` (null: not known yet) as the upstream preview file shown beside the run of ``output``. */
export function noteRunUpstream(output, file) {
  noteForRun(RUN_UPSTREAM, runKey(output), file);
}

/** Notes that the pictures of the run of UI payload ``output`` are gone from the server. */
export function noteLostRun(output) {
  noteForRun(LOST_RUNS, runKey(output), true);
}

/** Whether the pictures of the run of UI payload ``output`` are gone from the server (noteLostRun). */
export function isLostRun(output) {
  return LOST_RUNS.has(runKey(output));
}
