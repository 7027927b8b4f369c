// HeadSeg front end: the picture the node feeding a picker's ``image`` input shows (e.g. Load Image's
// preview), which the picker (picker.js) shows before the first run and compares with the one shown beside
// each run. Only exports: ComfyUI loads every .js file here as an extension module.

import { app } from "../../scripts/app.js";
import { fileUrl } from "./dom_helpers.js";
import { inputOrigin, storedOutput } from "./graph_helpers.js";

/** The file a preview URL shows: the URL without the random parameter ComfyUI adds to each new preview
 * of the same file (null for none). */
export function previewFile(src) {
  if (!src) return null;
  try {
    const url = new URL(src, window.location.href);
    url.searchParams.delete("rand");
    url.searchParams.sort();
    return url.href;
  } catch {
    return src;
  }
}

/** Whether preview URL ``src`` shows server file ``ref`` ({filename, subfolder, type}). */
function showsFile(src, ref) {
  try {
    const params = new URL(src, window.location.href).searchParams;
    const same = (key) => (params.get(key) ?? "") === (typeof ref?.[key] === "string" ? ref[key] : "");
    return typeof ref?.filename === "string" && same("filename") && same("subfolder") && same("type");
  } catch {
    return false;
  }
}

// Kept output image ref -> its /view URL (storedPreviewUrl). ComfyUI keeps a new ref object for each
// picture chosen (or run), so the URL, with its random parameter, stays the same until then.
const STORED_PREVIEW_URLS = new WeakMap();

/** The /view URL of kept output image ``ref`` ({filename, subfolder, type}; null when it is not one),
 * with a random parameter as ComfyUI gives each new preview: a file written again under the same name
 * is loaded anew, not taken from the browser's cache. */
function storedPreviewUrl(ref) {
  if (!ref || typeof ref !== "object") return null;
  if (!STORED_PREVIEW_URLS.has(ref)) {
    const url = fileUrl(ref);
    STORED_PREVIEW_URLS.set(ref, url && url + (app.getRandParam?.() ?? ""));
  }
  return STORED_PREVIEW_URLS.get(ref);
}

/** The node that feeds input ``image`` of ``node`` (through Reroute nodes and subgraph inputs), or null. */
export function upstreamNode(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "image") ?? -1;
  return slot < 0 ? null : inputOrigin(node, slot);
}

/** The URL of the picture the node feeding ``image`` of ``node`` shows (null for none). The classic canvas
 * sets node.imgs when it draws the node; the Vue node renderer ("Nodes 2.0") never draws nodes on the
 * canvas, so there node.imgs keeps the first preview (Load Image's first picture) and the node shows the
 * pictures of its kept outputs instead (as the front end's getNodeImageUrls): while node.imgs shows none of
 * them, the picker shows the chosen one of those. */
export function upstreamPreview(node) {
  const origin = upstreamNode(node);
  const img = origin?.imgs?.[origin.imageIndex ?? 0] ?? origin?.imgs?.[0];
  const src = img?.src || null;
  if (!origin || !globalThis.LiteGraph?.vueNodesMode) return src;
  const images = storedOutput(origin)?.images;
  if (!Array.isArray(images) || !images.length || (src && images.some((ref) => showsFile(src, ref)))) return src;
  return storedPreviewUrl(images[origin.imageIndex ?? 0] ?? images[0]) ?? src;
}

/** Whether the upstream preview of ``node`` still shows a picture from before its upstream node's latest
 * outputs: ComfyUI keeps a run's outputs at once, but sets node.imgs only once their pictures have loaded
 * (and the node is drawn: never while it is out of view), which is often after this node's own run reached
 * the picker. In the Vue node renderer upstreamPreview shows the kept outputs themselves: never loading
 * there. */
export function upstreamPreviewLoading(node) {
  const origin = upstreamNode(node);
  const images = origin ? storedOutput(origin)?.images : null;
  if (!Array.isArray(images) || !images.length) return false; // a preview not from outputs: as it is shown
  const src = upstreamPreview(node);
  return !src || !images.some((ref) => showsFile(src, ref));
}

/** The file the upstream preview of ``node`` shows now (null while it loads the upstream node's latest
 * outputs, or none). */
export function upstreamFileNow(node) {
  return upstreamPreviewLoading(node) ? null : previewFile(upstreamPreview(node));
}
