// HeadSeg front end: hooks the HeadSeg_MaskSelectAtPixel node type up to its picker (picker.js): a
// DOM widget on each node, run results passed on, the canvas draw and graph membership followed.
// Only exports: ComfyUI loads every .js file here as an extension module.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { livePickers, trackPicker } from "./live_pickers.js";
import { Picker } from "./picker.js";
import { noteQueued, noteRun, upstreamAtQueue } from "./picker_runs.js";
import { PICKER_MIN_HEIGHT } from "./styles.js";

const PICKER_WIDGET = "headseg_picker";

// Whether ComfyUI's api is hooked up (hookApiOnce).
let apiHooked = false;

/** Hooks ComfyUI's api up to the pickers, once: setupPicker runs again for each new registration of the node
 * type (Refresh Node Definitions, the R key, registers every node type again), and a second set of
 * listeners would end each prompt as it starts (noteRun), a second wrapper note each prompt twice. */
function hookApiOnce() {
  if (apiHooked) return;
  apiHooked = true;
  // which nodes run in the prompt under way: the picker tells the upstream preview of a run from another
  // picture chosen upstream while it ran
  for (const type of ["execution_start", "executed", "execution_success", "execution_error", "execution_interrupted"]) {
    api.addEventListener(type, (e) => noteRun(type, e.detail));
  }
  // ... and which picture each picker showed when the prompt was queued, from which workflow: one that waits
  // in the queue while another picture is chosen upstream segments the first, and ComfyUI hands its runs to
  // the nodes of the workflow open when they end (ComfyUI's api.queuePrompt sends the prompt the front end
  // has just built from the open graph, and answers its id; arguments and answer passed on as they are)
  const queuePrompt = api.queuePrompt;
  if (typeof queuePrompt === "function") {
    api.queuePrompt = async function (...args) {
      const shown = upstreamAtQueue(livePickers());
      const workflow = app.extensionManager?.workflow?.activeWorkflow ?? null;
      const result = await queuePrompt.apply(this, args);
      noteQueued(result?.prompt_id, shown, workflow, args[0] === 0); // number 0: at the back of the queue
      return result;
    };
  }
}

/** Gives each node of ``nodeType`` (HeadSeg_MaskSelectAtPixel) a picker in a DOM widget, and passes
 * it the node's runs (and the start of each prompt), canvas draws, and its joining and leaving a graph. */
export function setupPicker(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const picker = new Picker(this);
    const w = this.addDOMWidget(PICKER_WIDGET, "headseg-picker", picker.root, {
      serialize: false,
      hideOnZoom: true,
      // not listed in the side panel's inputs (1.58's right side panel), where it had nothing to edit; older
      // frontends (1.32.9) have no such panel and ignore the option
      hideInPanel: true,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => PICKER_MIN_HEIGHT,
    });
    w.serialize = false; // takes no slot in widgets_values: old and new layouts line up
    this.headsegPicker = picker;
    const [width, height] = this.size;
    this.setSize([Math.max(width, 320), Math.max(height, 440)]);
    return result;
  };

  hookApiOnce();

  const onExecutionStart = nodeType.prototype.onExecutionStart;
  nodeType.prototype.onExecutionStart = function () {
    const result = onExecutionStart?.apply(this, arguments);
    this.headsegPicker?.onExecutionStart();
    return result;
  };

  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    const result = onExecuted?.apply(this, arguments);
    this.headsegPicker?.onExecuted(output);
    return result;
  };

  // The picker shows this node's pictures itself; ComfyUI's default image preview is not drawn.
  nodeType.prototype.onDrawBackground = function () {};

  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function () {
    const result = onDrawForeground?.apply(this, arguments);
    if (!this.flags?.collapsed) this.headsegPicker?.tick();
    return result;
  };

  const onAdded = nodeType.prototype.onAdded;
  nodeType.prototype.onAdded = function () {
    const result = onAdded?.apply(this, arguments);
    if (this.headsegPicker) trackPicker(this.headsegPicker, true);
    return result;
  };

  const onRemoved = nodeType.prototype.onRemoved;
  nodeType.prototype.onRemoved = function () {
    this.headsegPicker?.destroy();
    return onRemoved?.apply(this, arguments);
  };
}
