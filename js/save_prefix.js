// HeadSeg front end: %date:yyyy-MM-dd% and %Node name.widget% in the Save nodes' filename_prefix,
// filled in when the workflow is queued. Only exports: ComfyUI loads every .js file here as an
// extension module.

import { app } from "../../scripts/app.js";

/** Save nodes: %date:yyyy-MM-dd% and %Node name.widget% in filename_prefix are filled in when the
 * workflow is queued, as ComfyUI's front end does for its own save nodes (the workflow keeps the
 * pattern; %width%, %height%, %year% ... are the server's). A node without filename_prefix, or a
 * front end without applyTextReplacements, is left as it is. */
export function fillPrefixPatternsWhenQueued(node) {
  const prefix = node.widgets?.find((w) => w.name === "filename_prefix");
  const replace = window.comfyAPI?.utils?.applyTextReplacements;
  if (prefix && typeof replace === "function") prefix.serializeValue = () => replace(app, prefix.value);
}
