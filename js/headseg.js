// HeadSeg front end: click-to-pick pixel picker and mask browser for HeadSeg_MaskSelectAtPixel,
// a result line on the other HeadSeg nodes (with the k of each multi-k colour map), and tolerant
// loading of older widget layouts. Shared helpers are in styles.js, dom_helpers.js and
// graph_helpers.js: ComfyUI imports every .js file of this folder as an extension module, so those
// only export.
//
// UI payload read from HeadSeg_MaskSelectAtPixel (every key optional, see js/docs):
//   headseg_image     [ref]          picture the picker shows (any size, same aspect ratio)
//   headseg_size      [W, H]         pixel grid that x / y refer to (the masks' resolution)
//   headseg_pixel     [x, y]         pixel the masks below were computed for
//   headseg_pixel_asked [x, y]       the x / y inputs of that run (differ when a pixel picked on the
//                                    picture before the first run was mapped onto the masks' grid, or
//                                    a pixel past its right / bottom edge moved to the nearest one)
//   headseg_index     [i]            index the MASK output carries
//   headseg_masks     [ref, ...]     overlay picture of each mask containing the pixel, finest first
//   headseg_mask_info [{area, k, cluster}, ...]
// where ref = {filename, subfolder, type} as served by /view.

import { app } from "../../scripts/app.js";
import { el, fileUrl } from "./dom_helpers.js";
import {
  SUBGRAPH_OUTPUT_ID,
  graphLink,
  inWorkflow,
  inputOrigin,
  isLinked,
  outputKey,
  recordChange,
  setWidget,
  storedOutput,
  widget,
} from "./graph_helpers.js";
import { PICKER_MIN_HEIGHT, addStyle } from "./styles.js";

const PICKER_NODE = "HeadSeg_MaskSelectAtPixel";
const AXES = [["x", 0], ["y", 1]]; // widget name, index in a [x, y] pixel
const PICKER_WIDGET = "headseg_picker";
const NOTE_WIDGET = "headseg_note";
const NO_IMAGE_TEXT =
  "No image yet: connect an image (e.g. Load Image) to 'image' or queue the workflow, then click here to pick a pixel.";
const LINKED_NO_PREVIEW_TEXT =
  "The picture comes from a node that shows no preview here (or from outside this subgraph): queue the workflow once, then click here to pick a pixel.";

/** A positive integer pair [W, H] from a payload value, else null. */
function sizePair(value) {
  if (!Array.isArray(value) || value.length < 2) return null;
  const [w, h] = value.map(Number);
  if (!Number.isFinite(w) || !Number.isFinite(h) || w < 1 || h < 1) return null;
  return [Math.round(w), Math.round(h)];
}

function finiteOr(value, fallback) {
  const n = Number(value);
  return Number.isFinite(n) ? n : fallback;
}

// A picker whose node has been out of the workflow this long (ms) goes (see Picker.dropIfGone).
const OUTSIDE_GRACE_MS = 1500;

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

// Pickers on the graph. Besides the canvas draw callback, a slow timer keeps them in step with
// their widgets and upstream previews when the canvas does not draw the node (e.g. Vue nodes).
// A picker joins when its node is added to a graph (onAdded), not when the node is built: LiteGraph
// builds a throwaway copy of a node to copy, clone or alt-drag it (node.clone()) that never joins a
// graph and would otherwise stay here, with the timer, for good.
const LIVE_PICKERS = new Set();
let liveTimer = null;

function trackPicker(picker, on) {
  if (on) LIVE_PICKERS.add(picker);
  else LIVE_PICKERS.delete(picker);
  if (LIVE_PICKERS.size && liveTimer === null) {
    liveTimer = setInterval(() => {
      for (const p of LIVE_PICKERS) if (!p.dropIfGone()) p.tick();
    }, 500);
  } else if (!LIVE_PICKERS.size && liveTimer !== null) {
    clearInterval(liveTimer);
    liveTimer = null;
  }
}

/** The picker + mask browser of one HeadSeg_MaskSelectAtPixel node. */
class Picker {
  constructor(node) {
    this.node = node;
    this.output = null; // last UI payload
    this.src = null; // picture shown
    this.size = null; // [W, H] the widgets refer to
    this.upstreamSrc = null;
    this.shown = {};

    addStyle();
    // widget-expands: in the Vue node renderer ("Nodes 2.0") the widget then takes the node's free height
    const root = (this.root = el("div", "headseg-picker widget-expands"));
    const stage = (this.stage = el("div", "headseg-stage", root));
    this.frame = el("div", "headseg-frame", stage);
    this.img = el("img", "headseg-base", this.frame);
    this.img.alt = "";
    this.hoverImg = el("img", "headseg-hover", this.frame);
    this.hoverImg.alt = "";
    this.marker = el("div", "headseg-marker", this.frame);
    this.message = el("div", "headseg-message", stage);
    this.message.textContent = NO_IMAGE_TEXT;
    this.info = el("div", "headseg-info", root);
    this.strip = el("div", "headseg-strip", root);
    this.frame.style.display = "none";

    this.img.addEventListener("load", () => this.onImageLoad());
    this.img.addEventListener("error", () => this.showMessage("Could not load the picture."));
    this.frame.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    // The wheel zooms the canvas, as over the rest of the node (a DOM widget would swallow it).
    root.addEventListener("wheel", (e) => this.forwardWheel(e), { passive: false });
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.layout());
      this.resizeObserver.observe(stage);
    }
    this.updateInfo();
  }

  destroy() {
    this.resizeObserver?.disconnect();
    trackPicker(this, false);
    this.root.dataset.dead = "1"; // a renderer that keeps showing it lets the node's next picker take its place
  }

  /** The Vue node renderer ("Nodes 2.0") can keep showing the element of the picker that an undo
   * replaced and never show this one: this picker then takes that element's place. */
  takeOverDeadElement() {
    if (this.root.isConnected) return;
    const key = outputKey(this.node);
    for (const old of document.querySelectorAll(".headseg-picker[data-dead='1']")) {
      if (old.dataset.key === key) {
        old.replaceWith(this.root);
        this.layout();
        return;
      }
    }
  }

  showMessage(text) {
    this.message.textContent = text;
    this.message.style.display = "";
    this.frame.style.display = "none";
  }

  /** Picture from the last run, else the upstream node's preview (e.g. Load Image). */
  refreshSource() {
    const ref = this.output?.headseg_image?.[0] ?? this.output?.images?.[0];
    const own = fileUrl(ref);
    if (own) {
      this.setSource(own, sizePair(this.output?.headseg_size));
      return;
    }
    const up = this.upstreamPreview();
    if (up) {
      this.setSource(up, null);
    } else if (!this.src) {
      this.showMessage(this.noImageText());
    }
  }

  /** What to say while there is no picture: connect one, or (connected) queue once to see it. */
  noImageText() {
    return isLinked(this.node, "image") ? LINKED_NO_PREVIEW_TEXT : NO_IMAGE_TEXT;
  }

  upstreamPreview() {
    const node = this.node;
    const slot = node.inputs?.findIndex((i) => i.name === "image") ?? -1;
    if (slot < 0 || node.inputs[slot].link == null) return null;
    const origin = inputOrigin(node, slot);
    const img = origin?.imgs?.[origin.imageIndex ?? 0] ?? origin?.imgs?.[0];
    return img?.src || null;
  }

  setSource(src, size) {
    this.sizeFromPayload = size;
    if (src === this.src) {
      if (size) this.size = size;
      this.layout();
      return;
    }
    this.src = src;
    this.size = size; // may be null until the picture loads
    this.img.src = src;
  }

  onImageLoad() {
    const { naturalWidth: w, naturalHeight: h } = this.img;
    if (!(w > 0 && h > 0)) return;
    this.natural = [w, h];
    if (!this.sizeFromPayload) this.size = [w, h];
    this.message.style.display = "none";
    this.frame.style.display = "";
    this.layout();
    this.sync(true);
  }

  /** Fits the frame (= displayed picture) inside the stage, keeping the aspect ratio. */
  layout() {
    const aspect = this.size ?? this.natural;
    if (!aspect) return;
    const sw = this.stage.clientWidth;
    const sh = this.stage.clientHeight;
    if (!(sw > 0 && sh > 0)) return;
    const fit = Math.min(sw / aspect[0], sh / aspect[1]);
    this.frame.style.width = `${Math.max(1, Math.floor(aspect[0] * fit))}px`;
    this.frame.style.height = `${Math.max(1, Math.floor(aspect[1] * fit))}px`;
    this.updateMarker();
  }

  forwardWheel(e) {
    const canvas = app.canvas?.canvas;
    if (!canvas || e.target?.closest?.(".headseg-strip")) return; // the strip scrolls sideways
    e.preventDefault();
    e.stopPropagation();
    canvas.dispatchEvent(new WheelEvent(e.type, e));
  }

  onPointerDown(e) {
    if (e.button !== 0 || !this.size) return;
    const p = clientToPixel(e.clientX, e.clientY, this.frame.getBoundingClientRect(), this.size);
    if (!p) return;
    e.preventDefault();
    e.stopPropagation();
    if (isLinked(this.node, "x") || isLinked(this.node, "y")) {
      this.info.textContent = "x / y come from a link: clicks do not change them";
      return;
    }
    setWidget(this.node, "x", p.x);
    setWidget(this.node, "y", p.y);
    this.sync(true);
    recordChange(); // one undo step per pick (the pointerdown handled here sends no mouseup)
  }

  /** The pixel the widgets ask for; a coordinate fed by a link is the one the last run used. While
   * the widgets not fed by a link still hold what the last run was asked, the pixel is the one that
   * run used (mapped from the picture, or moved onto the grid): e.g. x from a link and y past the
   * bottom edge, which the run moved and adoptMappedPixel leaves alone. */
  currentPixel() {
    const ran = this.output?.headseg_pixel;
    const last = this.lastRunPixels();
    const free = AXES.filter(([name]) => !isLinked(this.node, name));
    const fresh = last !== null && this.widgetsHold(free, last.asked);
    const value = (name, i) =>
      isLinked(this.node, name) || fresh
        ? Number(Array.isArray(ran) ? ran[i] : NaN)
        : Number(widget(this.node, name)?.value);
    const x = value("x", 0);
    const y = value("y", 1);
    if (!Number.isFinite(x) || !Number.isFinite(y)) return null;
    return { x, y };
  }

  updateMarker() {
    const p = this.currentPixel();
    if (!p || !this.size || p.x < 0 || p.y < 0 || p.x >= this.size[0] || p.y >= this.size[1]) {
      this.marker.style.display = "none";
      return;
    }
    this.marker.style.display = "block";
    this.marker.style.left = `${((p.x + 0.5) / this.size[0]) * 100}%`;
    this.marker.style.top = `${((p.y + 0.5) / this.size[1]) * 100}%`;
  }

  /** Payload pixel differs from the widgets: thumbnails are for another pixel. */
  isStale() {
    const p = this.currentPixel();
    const q = this.output?.headseg_pixel;
    if (!p || !Array.isArray(q) || q.length < 2) return false;
    return Number(q[0]) !== p.x || Number(q[1]) !== p.y;
  }

  updateInfo() {
    const p = this.currentPixel();
    const parts = [];
    if (p) parts.push(`x ${p.x}, y ${p.y}`);
    if (this.size) parts.push(`${this.size[0]}×${this.size[1]}`);
    const n = this.masks().filter((ref) => fileUrl(ref)).length;
    if (n) {
      parts.push(`${n} mask${n === 1 ? "" : "s"} here`);
      if (this.isStale()) parts.push("queue to update the masks");
    } else if (this.output && Array.isArray(this.output.headseg_masks) && !this.isStale()) {
      parts.push("no mask contains this pixel");
    } else if (this.src) {
      parts.push(this.isStale() ? "queue to see the masks here" : "click the picture to pick a pixel");
    }
    this.info.textContent = parts.join(" · ");
  }

  masks() {
    const out = this.output;
    if (!out) return [];
    if (Array.isArray(out.headseg_masks)) return out.headseg_masks;
    if (!out.headseg_image && Array.isArray(out.images)) return out.images.slice(1);
    return [];
  }

  buildStrip() {
    // a thumbnail removed under the pointer gets no pointerleave: its mask would stay over the picture
    this.hover(null);
    this.strip.replaceChildren();
    const info = Array.isArray(this.output?.headseg_mask_info) ? this.output.headseg_mask_info : [];
    this.masks().forEach((ref, i) => {
      const url = fileUrl(ref);
      if (!url) return;
      const button = el("button", "headseg-thumb", this.strip);
      button.type = "button";
      button.dataset.index = String(i);
      const meta = info[i] ?? {};
      const details = [`mask ${i}`];
      if (Number.isFinite(meta.area)) details.push(`${meta.area} px`);
      if (Number.isFinite(meta.k)) details.push(`k=${meta.k}, cluster ${meta.cluster}`);
      button.title = `${details.join(" · ")} — click to output this mask`;
      button.setAttribute("aria-label", details.join(", ")); // else read as "mask 0 0" (alt + number)
      const img = el("img", null, button);
      img.alt = `mask ${i}`;
      img.src = url;
      el("span", null, button).textContent = String(i);
      button.addEventListener("pointerenter", () => this.hover(url));
      button.addEventListener("pointerleave", () => this.hover(null));
      button.addEventListener("click", (e) => {
        e.preventDefault();
        e.stopPropagation();
        if (this.isStale()) return; // these thumbnails belong to the previous pixel: queue first
        setWidget(this.node, "index", i);
        this.sync(true);
        recordChange();
      });
    });
  }

  hover(url) {
    if (url) {
      this.hoverImg.src = url;
      this.frame.classList.add("headseg-hovering");
    } else {
      this.frame.classList.remove("headseg-hovering");
    }
  }

  /** Brings the DOM in line with the widgets; cheap when nothing changed. */
  sync(force = false) {
    const p = this.currentPixel();
    const index = Number(widget(this.node, "index")?.value);
    const key = `${p?.x},${p?.y},${index},${this.size}`;
    if (!force && key === this.shown.key) return;
    this.shown.key = key;
    this.updateMarker();
    this.updateInfo();
    const stale = this.isStale();
    this.strip.classList.toggle("headseg-stale", stale);
    const n = this.strip.children.length;
    const chosen = n ? Math.min(index, n - 1) : index; // an index past the last mask outputs the coarsest
    for (const b of this.strip.children) {
      const selected = Number(b.dataset.index) === chosen;
      b.classList.toggle("headseg-selected", selected);
      // the outline and the faded strip say so to the eye only
      b.setAttribute("aria-pressed", String(selected));
      b.setAttribute("aria-disabled", String(stale)); // a click is ignored until the next run
    }
  }

  onExecuted(output) {
    if (!output || typeof output !== "object") return;
    this.output = output;
    this.adoptMappedPixel();
    this.refreshSource();
    this.buildStrip();
    this.sync(true);
  }

  /** A pixel picked on the picture before the first run lies outside the masks' grid; the run maps
   * it onto that grid (any other pixel past the grid's right / bottom edge, e.g. one kept from a
   * larger image, it moves to the nearest pixel of the grid). Widgets that still ask for it take the
   * pixel the run used, so they name the pixel the masks are for. Both or neither: with x or y
   * from a link, or changed since, the widgets are left alone (one mapped coordinate beside an
   * unmapped one would name another pixel). */
  adoptMappedPixel() {
    const last = this.lastRunPixels();
    if (!last) return;
    const { asked, used } = last;
    if (AXES.every(([, i]) => Number(asked[i]) === Number(used[i]))) return;
    if (AXES.some(([name]) => isLinked(this.node, name))) return;
    if (!this.widgetsHold(AXES, asked)) return;
    for (const [name, i] of AXES) setWidget(this.node, name, Number(used[i]));
  }

  /** The last run's {asked, used} pixels ([x, y] each), or null when its payload lacks them. */
  lastRunPixels() {
    const asked = this.output?.headseg_pixel_asked;
    const used = this.output?.headseg_pixel;
    if (!Array.isArray(asked) || !Array.isArray(used) || asked.length < 2 || used.length < 2) return null;
    return { asked, used };
  }

  /** Whether the widgets of these axes still hold the pixel's coordinates. */
  widgetsHold(axes, pixel) {
    return axes.every(([name, i]) => Number(widget(this.node, name)?.value) === Number(pixel[i]));
  }

  /** A node inside a subgraph gets no onRemoved when the whole workflow is cleared or replaced, or
   * its subgraph node deleted: once it has been out of the workflow for a while, its picker goes.
   * True when it went. Run by the slow timer only: a node the canvas draws is in the workflow. */
  dropIfGone() {
    if (!this.node.graph) return false;
    const now = performance.now();
    this.outsideSince = inWorkflow(this.node) ? null : (this.outsideSince ?? now);
    if (this.outsideSince === null || now - this.outsideSince <= OUTSIDE_GRACE_MS) return false;
    this.destroy();
    this.root.remove();
    return true;
  }

  /** Called on every canvas draw of the node and by the slow timer: follows upstream previews and
   * widget edits. */
  tick() {
    if (!this.node.graph) return;
    const id = String(this.node.id);
    if (this.root.dataset.nodeId !== id) this.root.dataset.nodeId = id;
    const key = outputKey(this.node);
    if (this.root.dataset.key !== key) this.root.dataset.key = key;
    this.takeOverDeadElement();
    if (!this.output) {
      const stored = storedOutput(this.node);
      if (stored?.headseg_pixel || stored?.headseg_image) {
        this.onExecuted(stored); // the node was rebuilt (undo)
        return;
      }
      const up = this.upstreamPreview();
      if (up !== this.upstreamSrc) {
        this.upstreamSrc = up;
        if (up) this.setSource(up, null);
        else {
          this.src = null;
          this.size = null;
          this.natural = null;
          this.img.removeAttribute("src");
          this.showMessage(this.noImageText());
        }
      } else if (!up && !this.src && this.message.textContent !== this.noImageText()) {
        this.showMessage(this.noImageText()); // the image input was linked or unlinked
      }
    }
    this.sync(false);
  }
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

function setupPicker(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const picker = new Picker(this);
    const w = this.addDOMWidget(PICKER_WIDGET, "headseg-picker", picker.root, {
      serialize: false,
      hideOnZoom: true,
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
