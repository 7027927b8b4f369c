// HeadSeg front end: reading and editing ComfyUI's graph (links, subgraphs, widgets, the outputs
// ComfyUI keeps, the undo history), shared by the picker, the note line and the error_map
// migration. Only exports: ComfyUI loads every .js file here as an extension module.

import { app } from "../../scripts/app.js";

export const SUBGRAPH_INPUT_ID = -10; // LiteGraph's origin id for links that start at a subgraph's input
// (newer frontends, 1.58, keep a link's node ids as strings: "-10"; compare them as numbers)
export const SUBGRAPH_OUTPUT_ID = -20; // ... and target id for links that end at a subgraph's output

/** The key ComfyUI keeps a node's outputs under: its id, prefixed by its subgraph's id inside one. */
export function outputKey(node) {
  const graph = node.graph;
  const inSubgraph = graph && graph.isRootGraph === false && graph.id != null;
  return inSubgraph ? `${graph.id}:${node.id}` : String(node.id);
}

/** The id a run gives ``node``: its id after those of the subgraph nodes it sits in ("5:3"); null inside
 * a subgraph that not exactly one subgraph node uses. */
export function executionId(node, depth = 0) {
  const graph = node?.graph;
  if (!graph || depth > 16) return null;
  if (graph.isRootGraph !== false) return String(node.id);
  const users = subgraphNodesOf(graph);
  const outer = users.length === 1 ? executionId(users[0], depth + 1) : null;
  return outer === null ? null : `${outer}:${node.id}`;
}

/** The last UI payload ComfyUI keeps for ``node`` (restores a node rebuilt by undo or by opening its
 * workflow's tab again). A run's outputs are kept under outputKey; the ones a workflow tab gets back
 * when it is opened again are keyed by execution id, which differs inside a subgraph. */
export function storedOutput(node) {
  for (const key of [outputKey(node), executionId(node)]) {
    const out = key === null ? undefined : app.nodeOutputs?.[key];
    if (out && typeof out === "object") return out;
  }
  return null;
}

// UI payload object -> its runKey: a redraw asks again for the same object.
const RUN_KEYS = new WeakMap();

/** The identity of the run whose UI payload is ``output``, the same for the copies newer frontends (1.58) keep
 * of it: Mask Select's run id (headseg_run, a new one at each run and the same for a run served again from
 * ComfyUI's cache; a list input's runs, one per item, joined), else (another node's payload, or one without an
 * id) its content as JSON text. The picker keeps a key for each of its last 1000 runs: a run id is a few dozen
 * characters, where the JSON text of a run with 150 masks is about 16 KB. Two runs of the same picture, pixel and
 * masks, e.g. in two workflow tabs, have different ids. A payload is not changed once handed over, so its key is
 * worked out once. */
export function runKey(output) {
  if (!output || typeof output !== "object") return null;
  let key = RUN_KEYS.get(output);
  if (key === undefined) {
    key = runIdKey(output.headseg_run) ?? contentKey(output);
    RUN_KEYS.set(output, key);
  }
  return key;
}

/** The key of a run whose payload holds run ids ``ids`` (headseg_run: one per item run), or null where it holds
 * none. Never the JSON text of an object, which starts with "{". */
function runIdKey(ids) {
  if (!Array.isArray(ids) || !ids.length || !ids.every((id) => typeof id === "string" && id)) return null;
  return `run:${ids.join(",")}`;
}

/** UI payload ``output`` as JSON text (null where it is not JSON: no payload of a run, no run to know again). */
function contentKey(output) {
  try {
    return JSON.stringify(output);
  } catch {
    return null;
  }
}

/** Whether UI payload ``output`` is that of a run queued from another open workflow than the open one.
 * ComfyUI hands a run's 'executed' message to the node of the same id in the workflow open when the run
 * ends, whichever workflow queued it (e.g. the one this was duplicated from, with the same node ids), and
 * keeps the payload in the change tracker of the workflow that queued it first (which gives it back when
 * that tab is opened again). A tracker whose outputs are the very object ComfyUI keeps the open graph's
 * outputs in tells nothing: a graph loaded into a new tab without clearing (loadGraphData with clean
 * false and no workflow) keeps sharing the outputs of the tab open before. False where no other open
 * workflow is known to hold it (e.g. a run whose prompt ComfyUI had not noted yet): as a run of the
 * open one. */
export function fromOtherWorkflow(output) {
  const store = app.extensionManager?.workflow;
  const open = store?.activeWorkflow;
  if (!open || !output || typeof output !== "object") return false;
  const holds = (workflow) => {
    const kept = workflow?.changeTracker?.nodeOutputs;
    return !!kept && typeof kept === "object" && Object.values(kept).includes(output);
  };
  if (holds(open)) return false;
  const others = (store.openWorkflows ?? []).filter((w) => w !== open && w?.changeTracker?.nodeOutputs !== app.nodeOutputs);
  return others.some(holds);
}

/** Lets ComfyUI's undo history and unsaved-changes mark see an edit made outside its own widgets. */
export function recordChange() {
  noteGraphState(app.extensionManager?.workflow?.activeWorkflow?.changeTracker);
}

/** Whether change tracker ``tracker`` can note the graph's state (noteGraphState). */
export function notesGraphState(tracker) {
  return typeof tracker?.captureCanvasState === "function" || typeof tracker?.checkState === "function";
}

/** Has change tracker ``tracker`` note the graph as it is now (an undo step, the modified mark): through
 * captureCanvasState where the frontend has it (1.58 marks checkState deprecated, with a console warning),
 * else checkState (1.32). */
export function noteGraphState(tracker) {
  if (typeof tracker?.captureCanvasState === "function") tracker.captureCanvasState();
  else tracker?.checkState?.();
}

/** The node that feeds input ``slot`` of ``node``, followed back through legacy Reroute nodes and out
 * through the inputs of the subgraphs it sits in (when a subgraph has exactly one node using it); null
 * when there is none. */
export function inputOrigin(node, slot, depth = 0) {
  const graph = node?.graph;
  if (!graph || depth > 16) return null;
  const link = inputLink(node, slot);
  if (!link) return null;
  if (Number(link.origin_id) !== SUBGRAPH_INPUT_ID) {
    const origin = graph.getNodeById(link.origin_id);
    // a Reroute node (the front end's own, not in the prompt) passes on what its one input gets
    return origin?.type === "Reroute" ? inputOrigin(origin, 0, depth + 1) : origin;
  }
  const users = subgraphNodesOf(graph);
  return users.length === 1 ? inputOrigin(users[0], link.origin_slot, depth + 1) : null;
}

/** The link (LLink) that feeds input ``slot`` of ``node``, or null. Read through LGraphNode's getInputLink where
 * the frontend has it (1.58 marks input.link deprecated, with a console warning at each read); a subgraph
 * node's own getInputLink answers the link inside it that ends at its output of that number, so LGraphNode's
 * is called on it. */
export function inputLink(node, slot) {
  const graph = node?.graph;
  if (!graph || !(slot >= 0 && slot < (node.inputs?.length ?? 0))) return null;
  const read = node.isSubgraphNode?.() ? globalThis.LGraphNode?.prototype?.getInputLink : node.getInputLink;
  if (typeof read === "function") return read.call(node, slot) ?? null;
  return graphLink(graph, node.inputs[slot].link) ?? null;
}

/** Whether input ``slot`` of ``node`` is fed by a link: through isInputConnected where the frontend has it (as
 * inputLink), else its link id. */
export function isInputLinked(node, slot) {
  if (!(slot >= 0 && slot < (node?.inputs?.length ?? 0))) return false;
  if (typeof node.isInputConnected === "function") return node.isInputConnected(slot);
  return node.inputs[slot].link != null;
}

/** The links (LLink) that leave output ``slot`` of ``node``: those read by the inputs of the nodes it feeds and
 * by the outputs of the subgraph it sits in. Found through getOutputNodes, then the links of those nodes' inputs
 * (inputLink) and of the subgraph's outputs (their getLinks), where the frontend has getOutputNodes: 1.58 marks
 * output.links deprecated, with a console warning at each read, and getOutputNodes gives the nodes only, not
 * which of their inputs a link ends at. Else through output.links. */
export function outputLinks(node, slot) {
  const graph = node?.graph;
  if (!graph || !(slot >= 0 && slot < (node.outputs?.length ?? 0))) return [];
  if (typeof node.getOutputNodes !== "function") {
    return (node.outputs[slot].links ?? []).map((id) => graphLink(graph, id)).filter(Boolean);
  }
  const fromSlot = (link) => !!link && String(link.origin_id) === String(node.id) && link.origin_slot === slot;
  const links = [];
  for (const target of new Set(node.getOutputNodes(slot) ?? [])) {
    for (let input = 0; input < (target.inputs?.length ?? 0); input++) {
      const link = inputLink(target, input);
      if (fromSlot(link)) links.push(link);
    }
  }
  for (const output of graph.outputNode?.slots ?? []) links.push(...(output.getLinks?.() ?? []).filter(fromSlot));
  return links;
}

/** Link ``id`` of ``graph`` (a Map in current frontends, a plain object in older ones), or undefined. */
export function graphLink(graph, id) {
  const links = graph?._links ?? graph?.links;
  return links instanceof Map ? links.get(id) : links?.[id];
}

/** Whether ``node`` belongs to the open workflow: its root graph, or a subgraph it defines that a
 * subgraph node uses (a deleted subgraph node's definition stays behind). */
export function inWorkflow(node) {
  const graph = node.graph;
  if (!graph || graph.getNodeById?.(node.id) !== node) return false;
  const root = graph.rootGraph ?? graph;
  if (root !== app.graph) return false;
  if (graph === root) return true;
  return root.subgraphs?.get?.(graph.id) === graph && subgraphNodesOf(graph).length > 0;
}

/** The subgraph nodes, anywhere in the workflow, whose inside is ``graph``. */
export function subgraphNodesOf(graph) {
  const root = graph.rootGraph ?? app.graph;
  const graphs = [root, ...(root?.subgraphs?.values?.() ?? [])];
  return graphs.flatMap((g) => (g?.nodes ?? []).filter((n) => n.isSubgraphNode?.() && n.subgraph === graph));
}

/** Whether input ``name`` of ``node`` is fed by a link (a widget converted to an input). */
export function isLinked(node, name) {
  return node.inputs?.some((input, slot) => input.name === name && isInputLinked(node, slot)) ?? false;
}

/** Selects ``node`` and nothing else on the canvas that shows its graph, as a plain click on a node
 * does (LGraphCanvas.selectNode); a node already selected alone is left as it is. */
export function selectAlone(node) {
  const canvas = app.canvas;
  if (!node || !canvas?.selectNode || canvas.graph !== node.graph) return;
  const selected = [...(canvas.selectedItems ?? Object.values(canvas.selected_nodes ?? {}))];
  if (selected.length === 1 && selected[0] === node) return;
  canvas.selectNode(node, false);
}

/** Widget ``name`` of ``node``, or undefined. */
export function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

/** Sets a widget the way a user edit would: value, its callback, a redraw. */
export function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w) return false;
  const old = w.value;
  w.value = value;
  w.callback?.(w.value, app.canvas, node);
  node.onWidgetChanged?.(name, w.value, old, w);
  node.setDirtyCanvas?.(true, true);
  node.graph?.change?.();
  return true;
}
