// HeadSeg front end: small DOM helpers shared by the picker and the note line (building elements,
// the /view URL of a server file). Only exports: ComfyUI loads every .js file here as an extension
// module.

import { api } from "../../scripts/api.js";

/** A new ``tag`` element with ``className``, appended to ``parent`` when given. */
export function el(tag, className, parent) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (parent) parent.appendChild(node);
  return node;
}

/** URL of a server file reference {filename, subfolder, type}; null when it is not one. */
export function fileUrl(ref) {
  if (!ref || typeof ref !== "object" || typeof ref.filename !== "string") return null;
  const params = new URLSearchParams({
    filename: ref.filename,
    subfolder: typeof ref.subfolder === "string" ? ref.subfolder : "",
    type: typeof ref.type === "string" ? ref.type : "output",
  });
  return api.apiURL(`/view?${params}`);
}
