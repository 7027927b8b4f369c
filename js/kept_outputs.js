// HeadSeg front end: a run's outputs kept for undo whatever the order its messages came in. ComfyUI keeps the
// outputs of a run (its 'executed' messages) in the change tracker of the workflow that queued it, and hands
// them back as app.nodeOutputs to the graph that undo, redo or the workflow's tab opened again rebuilds
// (ChangeTracker.restore). It finds that workflow from the prompt's id, which it learns from the answer to its
// /prompt request, and drops the 'executed' messages that came before that answer: those of nodes served from
// its cache, or quick to run. Once a later node's message was kept, undo after the run brought back only the
// outputs of the later nodes, and the early ones' were gone: Upsample rebuilt by Ctrl+Z after the first run
// lost its note line (and the height it had grown to for it) while Mask Merge kept its. Only exports: ComfyUI
// loads every .js file here as an extension module.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

// Prompt id -> {workflow: the workflow it was queued from (undefined until the page has the id), ended: whether
// its end came, outputs: node id -> its 'executed' messages' details in this prompt}. Dropped once the prompt
// has both; the oldest past PROMPTS_KEPT are dropped (prompts queued elsewhere, whose id this page never gets).
const PROMPTS = new Map();
const PROMPTS_KEPT = 100;

let hooked = false;

/** Follows the prompts this page queues, and gives the change tracker of the workflow each was queued from the
 * outputs of its messages that ComfyUI did not keep there, once: ``setup`` runs once a page. */
export function keepEarlyOutputs() {
  if (hooked) return;
  hooked = true;
  // ComfyUI's own listener (registered when its app starts, before any extension) has run by then
  api.addEventListener("executed", (e) => noteExecuted(e.detail));
  for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
    api.addEventListener(type, (e) => noteEnded(e.detail?.prompt_id));
  }
  const queuePrompt = api.queuePrompt;
  if (typeof queuePrompt !== "function") return;
  // arguments and answer passed on as they are
  api.queuePrompt = async function (...args) {
    const workflow = app.extensionManager?.workflow?.activeWorkflow ?? null;
    const result = await queuePrompt.apply(this, args);
    if (result?.prompt_id != null && workflow) {
      prompt(result.prompt_id).workflow = workflow;
      settle(String(result.prompt_id));
    }
    return result;
  };
}

function prompt(id) {
  const key = String(id);
  let entry = PROMPTS.get(key);
  if (!entry) {
    entry = { workflow: undefined, ended: false, outputs: new Map() };
    PROMPTS.set(key, entry);
    for (const old of PROMPTS.keys()) {
      if (PROMPTS.size <= PROMPTS_KEPT) break;
      PROMPTS.delete(old);
    }
  }
  return entry;
}

function noteExecuted(detail) {
  if (detail?.prompt_id == null || detail.node == null) return;
  const outputs = prompt(detail.prompt_id).outputs;
  const node = String(detail.node);
  outputs.set(node, [...(detail.merge ? outputs.get(node) ?? [] : []), detail]);
}

function noteEnded(id) {
  if (id == null || !PROMPTS.has(String(id))) return;
  PROMPTS.get(String(id)).ended = true;
  settle(String(id));
}

/** Gives the change tracker of the workflow that prompt ``id`` was queued from the outputs ComfyUI did not keep
 * there: at the answer (the messages before it), and again at the prompt's end (any that came between the answer
 * and the moment ComfyUI noted the prompt, e.g. where another extension's wrapper of api.queuePrompt answered
 * later). A payload ComfyUI kept is the very object of the message. A node's output in parts (merge) is given
 * only where the tracker has none for the node: ComfyUI joins the parts it kept to what the tracker had. */
function settle(id) {
  const entry = PROMPTS.get(id);
  if (!entry?.workflow) return;
  if (entry.ended) PROMPTS.delete(id);
  const tracker = entry.workflow.changeTracker;
  if (!tracker || typeof tracker !== "object") return;
  for (const [node, details] of entry.outputs) {
    const kept = tracker.nodeOutputs?.[node];
    const last = details[details.length - 1];
    if (last.merge ? kept != null : kept === last.output) continue;
    tracker.nodeOutputs ??= {};
    tracker.nodeOutputs[node] = last.merge ? joinParts(details) : last.output;
  }
}

/** The output that the parts ``details`` (merge messages, in order) make, joined as ComfyUI joins them: a list
 * grows by the next part's items, any other value is replaced. */
function joinParts(details) {
  const joined = {};
  for (const { output } of details) {
    for (const [key, value] of Object.entries(output ?? {})) {
      joined[key] = Array.isArray(joined[key]) && Array.isArray(value) ? joined[key].concat(value) : value;
    }
  }
  return joined;
}
