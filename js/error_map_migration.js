// HeadSeg front end: the migration of workflows saved when Upsample had a second output, error_map,
// run after each graph loads (in the root graph and every subgraph). Only exports: ComfyUI loads
// every .js file here as an extension module.

// LiteGraph is the front end's global.
import { graphLink, SUBGRAPH_OUTPUT_ID } from "./graph_helpers.js";

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
    const targets = (node.outputs[slot].links ?? [])
      .map((id) => graphLink(graph, id))
      .filter(Boolean)
      .map((link) =>
        link.target_id === SUBGRAPH_OUTPUT_ID
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
