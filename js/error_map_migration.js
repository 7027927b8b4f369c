// HeadSeg front end: the migration of workflows saved when Upsample had a second output, error_map,
// run after each graph loads (in the root graph and every subgraph), and of prompts in API format
// opened in the web UI. Only exports: ComfyUI loads every .js file here as an extension module.

// LiteGraph is the front end's global.
import { outputLinks, SUBGRAPH_OUTPUT_ID } from "./graph_helpers.js";

/**
 * Workflows saved before the upsampling-error map had a node of its own gave Upsample a second
 * output, error_map. After such a graph loads, each of those Upsample nodes hands the links of that
 * output to a new Upsampling Error Map node fed by its stack, and the old output is removed, so the
 * workflow queues as it did before.
 */
export function migrateUpsampleErrorMap(graph) {
  for (const node of [...(graph?.nodes ?? graph?._nodes ?? [])]) {
    if (node.type !== "HeadSeg_Upsample") continue;
    const slot = node.outputs?.findIndex((o) => o?.name === "error_map") ?? -1;
    if (slot < 1) continue;
    // [node or null, input slot, subgraph output or null]: a link may end at the subgraph's output
    const targets = outputLinks(node, slot).map((link) =>
      Number(link.target_id) === SUBGRAPH_OUTPUT_ID
        ? [null, link.target_slot, graph.outputNode?.slots?.[link.target_slot] ?? null]
        : [graph.getNodeById(link.target_id), link.target_slot, null],
    );
    node.disconnectOutput?.(slot);
    node.removeOutput(slot);
    if (!targets.length) continue;
    const errorMap = LiteGraph.createNode("HeadSeg_UpsamplingError");
    if (!errorMap) continue;
    errorMap.pos = [node.pos[0], node.pos[1] + node.size[1] + 60];
    graph.add(errorMap);
    node.connect(0, errorMap, 0);
    for (const [target, inputSlot, subgraphOutput] of targets) {
      if (target) errorMap.connect(0, target, inputSlot);
      else subgraphOutput?.connect?.(errorMap.outputs[0], errorMap);
    }
  }
}

/**
 * The same for a prompt in API format opened in the web UI (an API workflow file, or a picture or
 * recording that carries a prompt but no workflow): ComfyUI builds its graph from today's nodes, whose
 * Upsample has one output, and left out the link of every input that read ["<upsample id>", 1]. Each such
 * input is pointed at a new Upsampling Error Map node fed by that Upsample (one per Upsample, under the
 * next free number), as the server rewires a queued prompt (nodes/prompt_migration.py). In place;
 * returns the number of inputs rewired.
 */
export function migrateApiUpsampleErrorMap(prompt) {
  if (!prompt || typeof prompt !== "object" || Array.isArray(prompt)) return 0;
  const nodes = Object.entries(prompt).filter(([, node]) => node && typeof node === "object");
  const upsamples = new Set(nodes.filter(([, node]) => node.class_type === "HeadSeg_Upsample").map(([id]) => id));
  if (!upsamples.size) return 0;
  let next = Math.max(0, ...Object.keys(prompt).map(Number).filter(Number.isInteger)) + 1;
  const added = new Map(); // upsample id -> the id of its new error-map node
  let rewired = 0;
  for (const [, node] of nodes) {
    const inputs = node.inputs && typeof node.inputs === "object" ? node.inputs : {};
    for (const [name, value] of Object.entries(inputs)) {
      if (!Array.isArray(value) || value.length !== 2 || value[1] !== 1 || !upsamples.has(String(value[0]))) continue;
      const source = String(value[0]);
      if (!added.has(source)) {
        while (String(next) in prompt) next++;
        const id = String(next++);
        prompt[id] = {
          class_type: "HeadSeg_UpsamplingError",
          inputs: { stack: [value[0], 0] },
          _meta: { title: "HeadSeg Upsampling Error Map" },
        };
        added.set(source, id);
      }
      inputs[name] = [added.get(source), 0];
      rewired++;
    }
  }
  return rewired;
}
