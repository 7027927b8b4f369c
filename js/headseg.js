// HeadSeg front end, the extension entry: registers "HeadSeg.Frontend" with ComfyUI and hooks each
// HeadSeg node type up to the features of the modules beside it:
//   picker_node.js, picker.js, picker_pixels.js, picture_clicks.js, pixel_marks.js, thumbnail_strip.js,
//   upstream_preview.js, picker_runs.js, live_pickers.js
//                           click-to-pick picture and mask browser of HeadSeg_MaskSelectAtPixel
//   note_line.js            result line under the other HeadSeg nodes (the k of each colour map)
//   error_map_migration.js  Upsample's former error_map output rewired after a graph loads (and in
//                           prompts in API format opened here)
//   save_prefix.js          %date:...% and %Node.widget% in the Save nodes' filename_prefix
//   number_widgets.js       tolerant loading of older or damaged number- and text-widget values
//   group_nodes.js          Multi K-Means' seed and device inside a (deprecated) group node
//   own_changes.js          the pack's own changes after a run (node heights, the picker's frame) noted
//                           in ComfyUI's undo history without a step of their own
//   kept_outputs.js         a run's outputs kept for undo also where its first messages came before
//                           ComfyUI knew the prompt (its quick or cached nodes: their note lines)
//   graph_helpers.js, dom_helpers.js, styles.js  shared by the above
// ComfyUI imports every .js file of this folder as an extension module (recursively): this is the
// only one with side effects; the others only export, and are imported from here.

import { app } from "../../scripts/app.js";
import { migrateApiUpsampleErrorMap, migrateUpsampleErrorMap } from "./error_map_migration.js";
import { setupGroupNode } from "./group_nodes.js";
import { keepEarlyOutputs } from "./kept_outputs.js";
import { setupNoteLine } from "./note_line.js";
import { numberSpecs, repairNumberWidgets, repairTextWidgets, textSpecs } from "./number_widgets.js";
import { setupPicker } from "./picker_node.js";
import { fillPrefixPatternsWhenQueued } from "./save_prefix.js";

// The pointer-to-pixel mapping, still exported from here as before the front end was split.
export { clientToPixel } from "./picker_pixels.js";

const PICKER_NODE = "HeadSeg_MaskSelectAtPixel";

app.registerExtension({
  name: "HeadSeg.Frontend",
  setup() {
    keepEarlyOutputs(); // the outputs of a run's quick first nodes, for undo (kept_outputs.js)
    // A prompt in API format opened here is rewired too (error_map_migration.js); the caller's object is
    // left as it was.
    const loadApiJson = app.loadApiJson;
    if (typeof loadApiJson !== "function") return;
    app.loadApiJson = function (apiData, ...rest) {
      let data = apiData;
      try {
        data = structuredClone(apiData);
        migrateApiUpsampleErrorMap(data);
      } catch {
        data = apiData; // not plain data: handed on as it came
      }
      return loadApiJson.call(this, data, ...rest);
    };
  },
  nodeCreated(node) {
    setupGroupNode(node); // a group node holding a Multi K-Means (group_nodes.js); other nodes are left alone
  },
  afterConfigureGraph() {
    migrateUpsampleErrorMap(app.graph);
    for (const subgraph of app.graph?.subgraphs?.values?.() ?? []) migrateUpsampleErrorMap(subgraph);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (typeof name !== "string" || !name.startsWith("HeadSeg_")) return;

    // A seed here picks the k-means start: keep it fixed so that re-queueing after a click reuses
    // the cached clustering. The node asks for no control (control_after_generate=False), which
    // current frontends honour; this guards frontends that add a "randomize" control to any INT
    // input named seed (ComfyUI's group nodes do: group_nodes.js).
    const onNodeCreatedSeed = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreatedSeed?.apply(this, arguments);
      for (const w of this.widgets ?? []) {
        if (w.name === "control_after_generate" && w.value === "randomize") w.value = "fixed";
      }
      fillPrefixPatternsWhenQueued(this); // Save nodes: patterns in filename_prefix (save_prefix.js)
      return result;
    };

    const specs = numberSpecs(nodeData);
    const texts = textSpecs(nodeData);
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      repairNumberWidgets(this, info, specs);
      repairTextWidgets(this, info, texts);
      this.headsegPicker?.sync(true);
      return result;
    };

    if (name === PICKER_NODE) setupPicker(nodeType);
    else setupNoteLine(nodeType);
  },
});
