// HeadSeg front end: which pixel a Mask Select At Pixel node names. The mapping from a pointer
// position to a pixel of the picture, the [W, H] of a payload, and the rules that weigh the node's
// x / y widgets against the pixel its last run used (mapped onto the masks' grid, or fed by a link).
// Pure functions of a node and its last UI payload; used by the picker (picker.js). Only exports:
// ComfyUI loads every .js file here as an extension module.

import { isLinked, setWidget, widget } from "./graph_helpers.js";

const AXES = [["x", 0], ["y", 1]]; // widget name, index in a [x, y] pixel

/**
 * Maps a pointer position to an image pixel.
 * rect: the on-screen box of the displayed image (getBoundingClientRect: includes canvas zoom);
 * size: [W, H] pixel grid. Returns {x, y} (x = column, y = row) or null outside the image.
 */
export function clientToPixel(clientX, clientY, rect, size) {
  if (!rect || !size || !(rect.width > 0) || !(rect.height > 0)) return null;
  const fx = (clientX - rect.left) / rect.width;
  const fy = (clientY - rect.top) / rect.height;
  if (!Number.isFinite(fx) || !Number.isFinite(fy)) return null;
  if (fx < 0 || fx >= 1 || fy < 0 || fy >= 1) return null;
  const [W, H] = size;
  return {
    x: Math.min(W - 1, Math.max(0, Math.floor(fx * W))),
    y: Math.min(H - 1, Math.max(0, Math.floor(fy * H))),
  };
}

/** The first item's entries of the list ``key`` of a run's payload (headseg_masks, headseg_mask_info:
 * count "masks"; headseg_points: count "points"). ComfyUI runs the node once per item of a list input (e.g.
 * latents from Rebatch Latents) and joins the runs' payloads key by key: the picker shows the first item,
 * as it does with the one-entry keys (headseg_image, headseg_pixel, ...). The node says how many entries
 * are each item's (headseg_item); a payload without that count is taken whole. */
export function firstItem(output, key, count) {
  const list = output?.[key];
  if (!Array.isArray(list)) return list;
  const n = Number(output?.headseg_item?.[0]?.[count]);
  return Number.isInteger(n) && n >= 0 ? list.slice(0, n) : list;
}

/** A positive integer pair [W, H] from a payload value, else null. */
export function sizePair(value) {
  if (!Array.isArray(value) || value.length < 2) return null;
  const [w, h] = value.map(Number);
  if (!Number.isFinite(w) || !Number.isFinite(h) || w < 1 || h < 1) return null;
  return [Math.round(w), Math.round(h)];
}

/** The pixel the widgets of ``node`` ask for; a coordinate fed by a link is the one the last run
 * (UI payload ``output``) used. While the widgets not fed by a link still hold what the last run was
 * asked, the pixel is the one that run used (mapped from the picture, or moved onto the grid): e.g.
 * x from a link and y past the bottom edge, which the run moved and adoptMappedPixel leaves alone. */
export function currentPixel(node, output) {
  const ran = output?.headseg_pixel;
  const last = lastRunPixels(output);
  const free = AXES.filter(([name]) => !isLinked(node, name));
  const fresh = last !== null && widgetsHold(node, free, last.asked);
  const value = (name, i) =>
    isLinked(node, name) || fresh
      ? Number(Array.isArray(ran) ? ran[i] : NaN)
      : Number(widget(node, name)?.value);
  const x = value("x", 0);
  const y = value("y", 1);
  if (!Number.isFinite(x) || !Number.isFinite(y)) return null;
  return { x, y };
}

/** Payload pixel (or more_points) differs from the widgets: thumbnails are for another pixel. */
export function isStale(node, output) {
  if (pointsStale(node, output)) return true;
  const p = currentPixel(node, output);
  const q = output?.headseg_pixel;
  if (!p || !Array.isArray(q) || q.length < 2) return false;
  return Number(q[0]) !== p.x || Number(q[1]) !== p.y;
}

/** A pixel picked on the picture before the first run lies outside the masks' grid; the run maps
 * it onto that grid (any other pixel past the grid's right / bottom edge, e.g. one kept from a
 * larger image, it moves to the nearest pixel of the grid). Widgets that still ask for it take the
 * pixel the run used, so they name the pixel the masks are for. Both or neither: with x or y
 * from a link, or changed since, the widgets are left alone (one mapped coordinate beside an
 * unmapped one would name another pixel). */
export function adoptMappedPixel(node, output) {
  const last = lastRunPixels(output);
  if (!last) return;
  const { asked, used } = last;
  if (AXES.every(([, i]) => Number(asked[i]) === Number(used[i]))) return;
  if (AXES.some(([name]) => isLinked(node, name))) return;
  if (!widgetsHold(node, AXES, asked)) return;
  for (const [name, i] of AXES) setWidget(node, name, Number(used[i]));
}

/** The last run's {asked, used} pixels ([x, y] each), or null when its payload lacks them. */
function lastRunPixels(output) {
  const asked = output?.headseg_pixel_asked;
  const used = output?.headseg_pixel;
  if (!Array.isArray(asked) || !Array.isArray(used) || asked.length < 2 || used.length < 2) return null;
  return { asked, used };
}

/** Whether the widgets of these axes still hold the pixel's coordinates. */
function widgetsHold(node, axes, pixel) {
  return axes.every(([name, i]) => Number(widget(node, name)?.value) === Number(pixel[i]));
}

// ------------------------------------------------------------------ more_points (shift / alt-click)
// The node's more_points text: "x,y" pairs separated by ";", a leading "-" for a pixel the masks must
// not contain (nodes/core/masks.py parse_points reads the same text with the same grammar: blanks as
// \s, ASCII digits; entries it would refuse are skipped here, the node names them when queued).

// The most pixels the node takes in more_points (nodes/core/masks.py MAX_POINTS: more are refused when queued).
// The picker draws a ring on at most as many: a text of hundreds of thousands of pixels (a damaged or crafted
// shared workflow) built one element each and froze the tab.
export const MAX_POINTS = 1024;

/** "12,40; -300,200" -> [{x: 12, y: 40, keep: true}, {x: 300, y: 200, keep: false}]. */
export function parsePoints(text) {
  if (typeof text !== "string") return [];
  const points = [];
  for (const raw of text.split(/[;\n]/)) {
    // trim() strips exactly \s; blanks on both sides of the optional "-" in one expression took time in the
    // square of a run of blanks (64 000 blanks before a typo: 12 s with the tab frozen)
    const m = /^(-?)\s*(\d+)\s*,\s*(\d+)$/.exec(raw.trim());
    if (m) points.push({ x: coordinate(m[2]), y: coordinate(m[3]), keep: m[1] !== "-" });
  }
  return points;
}

// A coordinate of more digits than this is read as POINT_BEYOND, past any grid or picture (as
// parse_points reads it): formatPoints then writes no "1e+21" or "Infinity" that the node refuses.
const POINT_DIGITS = 9;
const POINT_BEYOND = 10 ** POINT_DIGITS;

function coordinate(digits) {
  const d = digits.replace(/^0+(?=\d)/, "");
  return d.length > POINT_DIGITS ? POINT_BEYOND : Number(d);
}

/** [{x, y, keep}] -> "12,40; -300,200". */
export function formatPoints(points) {
  return points.map((p) => `${p.keep ? "" : "-"}${p.x},${p.y}`).join("; ");
}

/** more_points text with pixel p toggled: p is added, kept in (keep: shift-click) or left out (alt-click);
 * on an entry within a few pixels of it (2 % of the grid's longer side, at least 2), a shift-click turns
 * a pixel kept in into one left out (so that a "left out" pixel can be had where the system takes
 * alt-clicks, e.g. Linux desktops that move windows with Alt+drag), and any other click removes it.
 * size: [W, H] of the grid. Entries that are no pixel (a typo) are kept as written, for the node to
 * name when queued, not dropped unseen. */
export function togglePoint(text, p, keep, size) {
  const entries = (typeof text === "string" ? text.split(/[;\n]/) : [])
    .map((raw) => raw.trim())
    .filter((raw) => raw !== "")
    .map((raw) => parsePoints(raw)[0] ?? raw); // a point, or the text of an entry that is none
  const reach = Math.max(2, Math.round(0.02 * Math.max(...(size ?? [0, 0]))));
  const near = entries.findIndex(
    (q) => typeof q !== "string" && Math.abs(q.x - p.x) <= reach && Math.abs(q.y - p.y) <= reach,
  );
  if (near >= 0 && keep && entries[near].keep) entries[near] = { ...entries[near], keep: false };
  else if (near >= 0) entries.splice(near, 1);
  else entries.push({ x: p.x, y: p.y, keep });
  return entries.map((q) => (typeof q === "string" ? q : formatPoints([q]))).join("; ");
}

/** The pixels of more_points to mark: the widget's, or the last run's (mapped onto the masks' grid)
 * while the widget still holds the text that run was asked, or fed by a link (none before a run). */
export function currentPoints(node, output) {
  const asked = output?.headseg_points_asked?.[0];
  const used = runPoints(output);
  const text = widget(node, "more_points")?.value;
  const linked = isLinked(node, "more_points");
  if (used !== null && (linked || (typeof asked === "string" && text === asked))) return used;
  return linked ? [] : parsePoints(text); // a link's text is known after a run, not the widget's old one
}

/** The more_points text a shift- or alt-click edits: the widget's, or while it still holds the text the
 * last run was given (e.g. a node rebuilt by undo, which takes no pixels over), the pixels that run mapped
 * it to on the masks' grid, which the rings show and the click is on. */
export function pointsText(node, output) {
  const text = widget(node, "more_points")?.value;
  const used = runPoints(output);
  const asked = output?.headseg_points_asked?.[0];
  return used !== null && typeof asked === "string" && text === asked ? formatPoints(used) : text;
}

/** The widget's more_points differ from those of the last run: its thumbnails are for other points. The
 * masks listed depend on which pixels are in and out, not on their order or repeats: the same pixels
 * written in another order are not stale. */
export function pointsStale(node, output) {
  const asked = output?.headseg_points_asked?.[0];
  if (typeof asked !== "string" || isLinked(node, "more_points")) return false;
  const text = widget(node, "more_points")?.value ?? "";
  return text !== asked && pointSet(parsePoints(text)) !== pointSet(runPoints(output) ?? []);
}

/** [{x, y, keep}] -> its distinct entries as one text, in a fixed order (for comparing sets of points). */
function pointSet(points) {
  return [...new Set(points.map((p) => formatPoints([p])))].sort().join("; ");
}

/** As adoptMappedPixel for more_points: while the widget still holds the text of the last run, whose
 * pixels it mapped onto the masks' grid, the widget takes the pixels it used. */
export function adoptMappedPoints(node, output) {
  const asked = output?.headseg_points_asked?.[0];
  const used = runPoints(output);
  if (typeof asked !== "string" || used === null || isLinked(node, "more_points")) return;
  if (widget(node, "more_points")?.value !== asked) return;
  const text = formatPoints(used);
  if (formatPoints(parsePoints(asked)) !== text) setWidget(node, "more_points", text);
}

/** The last run's more_points pixels on the masks' grid (UI payload headseg_points [[x, y, 1|0], ...])
 * as [{x, y, keep}], or null when its payload has none. The node lists the pixels kept in first, then
 * those left out; they are put back in the order of the entries of the text it was asked
 * (headseg_points_asked), so that a text whose pixels the run did not move reads the same. */
function runPoints(output) {
  const used = firstItem(output, "headseg_points", "points");
  if (!Array.isArray(used)) return null;
  const points = used.filter((q) => Array.isArray(q) && q.length >= 3).map(([x, y, k]) => ({ x, y, keep: !!k }));
  const asked = parsePoints(output?.headseg_points_asked?.[0]);
  const kept = points.filter((q) => q.keep);
  const out = points.filter((q) => !q.keep);
  if (asked.length !== points.length || asked.filter((q) => q.keep).length !== kept.length) return points;
  return asked.map((q) => (q.keep ? kept : out).shift());
}

// ------------------------------------------------------------------ the frame of the last run
// ComfyUI keeps no node outputs across a page reload (nor for a node converted into a subgraph, pasted
// or cloned): the picker then shows the connected picture again. The node's properties (saved with the
// workflow) keep the frame of its last run with a picture: the masks' grid and the picture's size. A
// picture of that size is then shown as that run placed it on the grid, so that the cross and a click
// name the pixel the node will read (x / y inside the grid are read as pixels of the grid).

const FRAME = "headseg_frame";
// The largest side of the masks' grid a run reports (nodes/core/recording.py MAX_IMAGE_SIDE): a kept frame
// whose grid is larger comes from no run (a crafted or damaged workflow file) and is not used.
const MAX_GRID_SIDE = 16384;

/** The frame of a run's payload: {grid: [W, H], picture: [w, h]}, or null for a run without a picture. */
export function runFrame(output) {
  const grid = sizePair(output?.headseg_size);
  const picture = sizePair(output?.headseg_picture_size);
  return grid && picture ? { grid, picture } : null;
}

/** Keeps the frame of run ``output`` in the node's properties -> whether they changed. Written only when
 * the frame changes: the properties are part of the saved workflow, so a change marks it modified and
 * is an undo step. */
export function rememberFrame(node, output) {
  const frame = runFrame(output);
  const props = (node.properties ??= {});
  if (JSON.stringify(props[FRAME] ?? null) === JSON.stringify(frame)) return false;
  if (frame) props[FRAME] = frame;
  else delete props[FRAME];
  return true;
}

/** The masks' grid [W, H] on which the node reads a picture of size [w, h] shown without a run: the
 * remembered frame's when it was remembered for a picture of this size, else null (another picture, or a
 * grid wider or taller than any run reports: the properties come from the workflow file, a shared one too). */
export function rememberedGrid(node, picture) {
  const frame = node.properties?.[FRAME];
  const grid = sizePair(frame?.grid);
  const was = sizePair(frame?.picture);
  if (!grid || !was || !picture || was[0] !== picture[0] || was[1] !== picture[1]) return null;
  return Math.max(...grid) <= MAX_GRID_SIDE ? grid : null;
}

/** Where a picture [w, h] lies on the masks' grid [W, H] as the node fits it (nodes/core/pixels.py,
 * fit_picture): {left, top, width, height} in pixels of the grid. A picture of the grid's size, or up to
 * 7 px larger per side (its multiple of 8 is the grid), is VAE Encode's: its centred window is the grid;
 * any other size is stretched onto the grid. */
export function pictureBox(picture, grid) {
  const [w, h] = picture;
  const [W, H] = grid;
  const vae = Math.floor(w / 8) * 8 === W && Math.floor(h / 8) * 8 === H;
  if (!vae && !(w === W && h === H)) return { left: 0, top: 0, width: W, height: H };
  return { left: -Math.floor((w - W) / 2), top: -Math.floor((h - H) / 2), width: w, height: h };
}
