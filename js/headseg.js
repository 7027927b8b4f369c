// HeadSeg front end: click-to-pick pixel picker and mask browser for HeadSeg_MaskSelectAtPixel
// (picker_node.js, picker.js, picker_pixels.js, live_pickers.js), a result line on the other HeadSeg
// nodes (with the k of each multi-k colour map), and tolerant loading of older widget layouts.
// Shared helpers are in styles.js, dom_helpers.js and graph_helpers.js. ComfyUI imports every .js
// file of this folder as an extension module: only this one has side effects, the others only
// export.

import { app } from "../../scripts/app.js";
import { el } from "./dom_helpers.js";
import { SUBGRAPH_OUTPUT_ID, graphLink, storedOutput } from "./graph_helpers.js";
import { setupPicker } from "./picker_node.js";
import { addStyle } from "./styles.js";

// The pointer-to-pixel mapping, still exported from here as before the picker had modules of its own.
export { clientToPixel } from "./picker_pixels.js";

const PICKER_NODE = "HeadSeg_MaskSelectAtPixel";
const NOTE_WIDGET = "headseg_note";

function finiteOr(value, fallback) {
  const n = Number(value);
  return Number.isFinite(n) ? n : fallback;
}

/** name -> {int, default, min, max} for the INT and FLOAT inputs of a node definition. */
function numberSpecs(nodeData) {
  const specs = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
      if (!Array.isArray(spec) || (spec[0] !== "INT" && spec[0] !== "FLOAT")) continue;
      const opts = spec[1] ?? {};
      specs[name] = {
        int: spec[0] === "INT",
        default: finiteOr(opts.default, finiteOr(opts.min, 0)),
        min: finiteOr(opts.min, -Infinity),
        max: finiteOr(opts.max, Infinity),
      };
    }
  }
  return specs;
}

/**
 * Older or damaged saved layouts can put strings, nulls, objects or out-of-range numbers into the
 * number widgets (ComfyUI assigns widgets_values by position). Each saved value that is not a
 * number becomes the input's default; numbers are rounded (INT) and clamped to the input's range.
 */
function repairNumberWidgets(node, info, specs) {
  const saved = Array.isArray(info?.widgets_values) ? info.widgets_values : null;
  const widgets = (node.widgets ?? []).filter((w) => w.serialize !== false);
  widgets.forEach((w, i) => {
    const spec = specs[w.name];
    if (!spec) return;
    const raw = saved && i < saved.length ? saved[i] : w.value;
    const numeric =
      (typeof raw === "number" && Number.isFinite(raw)) ||
      (typeof raw === "string" && raw.trim() !== "" && Number.isFinite(Number(raw)));
    let value = numeric ? Number(raw) : spec.default;
    if (spec.int) value = Math.round(value);
    value = Math.min(spec.max, Math.max(spec.min, value));
    if (w.value !== value) w.value = value;
  });
}

/**
 * A small text line under the other HeadSeg nodes after a run: the node's ``text`` (e.g. how many
 * heads were recorded, how many masks were merged) and, on Multi K-Means, which k each colour map
 * shows (``headseg_labels``). Added on the first run that has something to say.
 */
class NoteLine {
  constructor(node) {
    this.node = node;
    this.text = [];
    this.labels = null;
    this.shown = null;
    addStyle();
    this.root = el("div", "headseg-note");
  }

  attach() {
    if (this.widget) return;
    this.widget = this.node.addDOMWidget(NOTE_WIDGET, "headseg-note", this.root, {
      serialize: false,
      hideOnZoom: true,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => 34,
      getMaxHeight: () => 64,
    });
    this.widget.serialize = false;
    const min = this.node.computeSize?.();
    if (min) this.node.setSize([Math.max(this.node.size[0], min[0]), Math.max(this.node.size[1], min[1])]);
  }

  onExecuted(output) {
    if (!output || typeof output !== "object") return;
    this.text = Array.isArray(output.text) ? output.text.map(String) : [];
    this.labels = Array.isArray(output.headseg_labels) ? output.headseg_labels.map(String) : null;
    if (this.text.length || this.labels?.length) this.attach();
    this.tick(true);
  }

  content() {
    const lines = [...this.text];
    if (this.labels?.length) {
      const i = this.node.imageIndex;
      if (i != null && this.labels[i]) lines.unshift(`showing ${this.labels[i]}`);
      else lines.unshift(`colour maps, left to right: ${this.labels.join(" · ")}`);
    }
    return lines.join("\n");
  }

  tick(force = false) {
    if (!this.widget) return;
    const text = this.content();
    if (!force && text === this.shown) return;
    this.shown = text;
    this.root.textContent = text;
    this.root.title = text;
  }
}

function setupNoteLine(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    const result = onExecuted?.apply(this, arguments);
    this.headsegNote ??= new NoteLine(this);
    this.headsegNote.onExecuted(output);
    return result;
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function () {
    const result = onDrawForeground?.apply(this, arguments);
    restoreNoteLine(this);
    this.headsegNote?.tick(false);
    return result;
  };
  // The Vue node renderer (Nodes 2.0) draws no canvas foreground: a node that undo rebuilt gets its
  // note line back once the rebuilt graph is configured and its outputs are there again
  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    setTimeout(() => {
      if (this.graph) restoreNoteLine(this);
    }, 0);
    return result;
  };
}

/** The note line of a node rebuilt from the saved graph (undo), from the outputs ComfyUI keeps. */
function restoreNoteLine(node) {
  if (node.headsegNote) return;
  const stored = storedOutput(node);
  if (stored && (Array.isArray(stored.text) || Array.isArray(stored.headseg_labels))) {
    node.headsegNote = new NoteLine(node);
    node.headsegNote.onExecuted(stored);
  }
}

/**
 * Workflows saved before the upsampling-error map had a node of its own gave Upsample a second
 * output, error_map. After such a graph loads, each of those Upsample nodes hands the links of that
 * output to a new Upsampling Error Map node fed by its stack, and the old output is removed, so the
 * workflow queues as it did before.
 */
function migrateUpsampleErrorMap(graph) {
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

app.registerExtension({
  name: "HeadSeg.Frontend",
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
    // input named seed.
    const onNodeCreatedSeed = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreatedSeed?.apply(this, arguments);
      for (const w of this.widgets ?? []) {
        if (w.name === "control_after_generate" && w.value === "randomize") w.value = "fixed";
      }
      // Save nodes: %date:yyyy-MM-dd% and %Node name.widget% in filename_prefix are filled in when the
      // workflow is queued, as ComfyUI's front end does for its own save nodes (the workflow keeps
      // the pattern; %width%, %height%, %year% ... are the server's)
      const prefix = this.widgets?.find((w) => w.name === "filename_prefix");
      const replace = window.comfyAPI?.utils?.applyTextReplacements;
      if (prefix && typeof replace === "function") prefix.serializeValue = () => replace(app, prefix.value);
      return result;
    };

    const specs = numberSpecs(nodeData);
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      repairNumberWidgets(this, info, specs);
      this.headsegPicker?.sync(true);
      return result;
    };

    if (name === PICKER_NODE) setupPicker(nodeType);
    else setupNoteLine(nodeType);
  },
});
