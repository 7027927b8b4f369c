// HeadSeg front end: the picker + mask browser of one HeadSeg_MaskSelectAtPixel node (class Picker):
// the picture to click on, the cross on the chosen pixel, rings on the more_points pixels
// (shift-click: in the masks, alt-click: not), an info line and a strip of mask thumbnails. The node type
// is hooked up to it in picker_node.js. Its parts live beside it: picture_clicks.js (what a click on the
// picture edits), pixel_marks.js (the cross, the rings, the info line's text), thumbnail_strip.js,
// upstream_preview.js (the picture the node feeding 'image' shows) and picker_runs.js (which run is whose).
// Only exports: ComfyUI loads every .js file here as an extension module.
//
// UI payload read from HeadSeg_MaskSelectAtPixel (every key optional, see js/docs):
//   headseg_image     [ref]          picture the picker shows (any size, same aspect ratio)
//   headseg_size      [W, H]         pixel grid that x / y refer to (the masks' resolution)
//   headseg_picture_size [w, h]      the connected image's size (kept in the node's properties with
//                                    headseg_size: the frame a picture of that size is shown in when the
//                                    run is gone, e.g. after a page reload; see picker_pixels.js)
//   headseg_pixel     [x, y]         pixel the masks below were computed for
//   headseg_pixel_asked [x, y]       the x / y inputs of that run (differ when a pixel picked on the
//                                    picture before the first run was mapped onto the masks' grid, or
//                                    a pixel past its right / bottom edge moved to the nearest one)
//   headseg_index     [i]            index the MASK output carries
//   headseg_masks     [ref, ...]     overlay picture of each mask containing the pixel, finest first
//   headseg_mask_info [{area, k, cluster}, ...]
//   headseg_points    [[x, y, 1|0], ...] the more_points pixels on the masks' grid (1 = in the masks)
//   headseg_points_asked [text]      the more_points input of that run
//   headseg_item      [{masks, points}] how many of headseg_masks (and _mask_info) and of headseg_points are
//                                    the first item's: a list input (Rebatch Latents) runs the node once per
//                                    item, and ComfyUI joins the runs' lists; the picker shows the first item
//   headseg_run       [id]           a new id at each run (again with a run served from the cache): the
//                                    run's key (runKey)
// where ref = {filename, subfolder, type} as served by /view.

import { app } from "../../scripts/app.js";
import { el, fileUrl } from "./dom_helpers.js";
import {
  executionId,
  inWorkflow,
  isLinked,
  outputKey,
  recordChange,
  selectAlone,
  setWidget,
  storedOutput,
  widget,
} from "./graph_helpers.js";
import { trackPicker } from "./live_pickers.js";
import { noteOwnChange } from "./own_changes.js";
import * as pixels from "./picker_pixels.js";
import {
  isLostRun,
  knownRun,
  noteLostRun,
  noteRunUpstream,
  otherWorkflowsRun,
  ranInPrompt,
  runUpstream,
  shownWhenQueued,
} from "./picker_runs.js";
import { clickPixel } from "./picture_clicks.js";
import { drawRings, infoText, placeMarker } from "./pixel_marks.js";
import { addStyle } from "./styles.js";
import { fillStrip, markChosen, revealChosen, scrollStrip } from "./thumbnail_strip.js";
import {
  previewFile,
  upstreamFileNow,
  upstreamNode,
  upstreamPreview,
  upstreamPreviewLoading,
} from "./upstream_preview.js";

const NO_IMAGE_TEXT =
  "No image yet: connect an image (e.g. Load Image) to 'image' or queue the workflow, then click here to pick a pixel.";
const LOST_RUN_TEXT =
  "The last run's pictures are gone (ComfyUI empties its temp folder when it starts): queue the workflow again, then click here to pick a pixel.";
const LINKED_NO_PREVIEW_TEXT =
  "The picture comes from a node that shows no preview here (or from outside this subgraph): queue the workflow once, then click here to pick a pixel.";

// A picker whose node has been out of the workflow this long (ms) goes (see Picker.dropIfGone).
const OUTSIDE_GRACE_MS = 1500;

/** The picker + mask browser of one HeadSeg_MaskSelectAtPixel node. */
export class Picker {
  constructor(node) {
    this.node = node;
    this.output = null; // last UI payload
    this.src = null; // picture shown
    this.size = null; // [W, H] the widgets refer to
    this.loading = false; // a new picture is loading: the one shown and this.size are the last one's
    this.upstreamSrc = null;
    this.upstreamAtStart = undefined; // the upstream preview file when the prompt under way started
    this.shown = {};
    this.pressId = undefined; // the pointer of a press on the picture, until its release

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
    this.rings = el("div", "headseg-rings", this.frame); // one ring per more_points pixel
    this.message = el("div", "headseg-message", stage);
    this.message.textContent = NO_IMAGE_TEXT;
    this.info = el("div", "headseg-info", root);
    this.strip = el("div", "headseg-strip", root);
    this.frame.style.display = "none";

    this.img.addEventListener("load", () => this.onImageLoad());
    this.img.addEventListener("error", () => this.onImageError());
    this.frame.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    for (const type of ["pointermove", "pointerup", "pointercancel", "lostpointercapture"]) {
      this.frame.addEventListener(type, (e) => this.onPressEvent(e));
    }
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

  /** The URL of the picture of the last run (its payload's), or null. */
  runPicture() {
    return fileUrl(this.output?.headseg_image?.[0] ?? this.output?.images?.[0]);
  }

  /** Picture from the last run, else the upstream node's preview (e.g. Load Image). */
  refreshSource() {
    const own = this.runPicture();
    if (own) {
      this.setSource(own, pixels.sizePair(this.output?.headseg_size));
      return;
    }
    const up = upstreamPreview(this.node);
    if (up) {
      this.setSource(up, null);
    } else if (!this.src) {
      this.showMessage(this.noImageText());
    }
  }

  /** What to say while there is no picture: connect one, or (connected) queue once to see it. */
  noImageText() {
    if (this.lostRun) return LOST_RUN_TEXT;
    return isLinked(this.node, "image") ? LINKED_NO_PREVIEW_TEXT : NO_IMAGE_TEXT;
  }

  /** The picture did not load. The last run's picture (and thumbnails) are gone when the server was
   * restarted since (a node rebuilt by undo or a workflow tab opened again gets that run back): the picker
   * goes back to the upstream preview as before the first run, or says to queue again. */
  onImageError() {
    const out = this.output;
    if (out && this.src === this.runPicture()) {
      noteLostRun(out);
      this.lostRun = true;
      this.dropOutdatedRun();
      return;
    }
    this.showMessage("Could not load the picture.");
  }

  /** Shows picture ``src``, whose pixel grid is ``size`` (null: the picture's own). The grid is taken when
   * the picture has loaded: until then the last picture stays on screen, and clicks are left alone (a
   * click would be mapped with the new grid onto the old picture). */
  setSource(src, size) {
    this.sizeFromPayload = size;
    if (src === this.src) {
      if (size && !this.loading) {
        this.size = size;
        this.placePicture(null);
      }
      this.layout();
      return;
    }
    this.src = src;
    this.loading = true;
    this.img.src = src;
  }

  onImageLoad() {
    const { naturalWidth: w, naturalHeight: h } = this.img;
    if (!(w > 0 && h > 0)) return;
    this.loading = false;
    this.natural = [w, h];
    // a picture shown without a run: on the masks' grid of the last run when it was of this size
    const grid = this.sizeFromPayload ? null : pixels.rememberedGrid(this.node, this.natural);
    this.size = this.sizeFromPayload ?? grid ?? this.natural;
    this.placePicture(grid && pixels.pictureBox(this.natural, grid));
    this.message.style.display = "none";
    this.frame.style.display = "";
    this.layout();
    this.sync(true);
  }

  /** Places the picture in the frame (= the grid this.size): filling it (null), or at ``box`` ({left, top,
   * width, height} in pixels of the grid, picker_pixels.js pictureBox) with only the grid's window shown. */
  placePicture(box) {
    const style = this.img.style;
    const [W, H] = this.size ?? [1, 1];
    const percent = (v, of) => `${(v / of) * 100}%`;
    style.left = box ? percent(box.left, W) : "";
    style.top = box ? percent(box.top, H) : "";
    style.width = box ? percent(box.width, W) : "";
    style.height = box ? percent(box.height, H) : "";
    const inset = box && [-box.top, box.width - W + box.left, box.height - H + box.top, -box.left];
    style.clipPath = box ? `inset(${inset.map((v, i) => percent(v, i % 2 ? box.width : box.height)).join(" ")})` : "";
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
    if (e.target?.closest?.(".headseg-strip")) {
      scrollStrip(this.strip, e);
      return;
    }
    const canvas = app.canvas?.canvas;
    if (!canvas) return;
    e.preventDefault();
    e.stopPropagation();
    canvas.dispatchEvent(new WheelEvent(e.type, e));
  }

  onPointerDown(e) {
    if (e.button !== 0 || !this.size || this.loading) return;
    const p = pixels.clientToPixel(e.clientX, e.clientY, this.frame.getBoundingClientRect(), this.size);
    if (!p) return;
    e.preventDefault();
    e.stopPropagation();
    this.holdPress(e);
    const refused = clickPixel(this.node, this.output, p, this.size, e);
    if (refused) {
      this.setInfo(refused);
      return;
    }
    this.sync(true);
    recordChange(); // one undo step per pick (the pointerdown handled here sends no mouseup)
  }

  /** Keeps the rest of a press handled here from the node: its moves, and its release with shift (ctrl,
   * meta) held. The Vue node renderer ("Nodes 2.0") drags a node on a move with shift held, and toggles
   * its selection on a shift-release, so a shift-click on the picture moved the node or added it to
   * the selection; a plain release still selects the node, as in the classic canvas: the picker selects
   * it (newer frontends' Vue nodes, 1.58, select a node only on the release of a press they saw begin,
   * and this one's pointerdown stops here). */
  holdPress(e) {
    this.pressId = e.pointerId;
    try {
      this.frame.setPointerCapture(e.pointerId); // the moves of this press come here, off the picture too
    } catch {
      // a synthetic event: no pointer to capture
    }
  }

  onPressEvent(e) {
    if (this.pressId === undefined || e.pointerId !== this.pressId) return;
    const multiSelect = e.shiftKey || e.ctrlKey || e.metaKey;
    if (e.type === "pointermove" || (e.type !== "lostpointercapture" && multiSelect)) e.stopPropagation();
    if (e.type === "pointerup" && !multiSelect) selectAlone(this.node);
    if (e.type !== "pointermove") this.pressId = undefined;
  }

  /** The pixel the widgets ask for, weighed against the last run (picker_pixels.js). */
  currentPixel() {
    return pixels.currentPixel(this.node, this.output);
  }

  /** The cross on the pixel the widgets ask for, the rings on the more_points pixels (pixel_marks.js). */
  updateMarker() {
    drawRings(this.rings, this.node, this.output, this.size);
    placeMarker(this.marker, this.currentPixel(), this.size);
  }

  /** Payload pixel differs from the widgets: thumbnails are for another pixel. */
  isStale() {
    return pixels.isStale(this.node, this.output);
  }

  updateInfo() {
    this.setInfo(infoText(this.node, this.output, this.size, this.src));
  }

  /** Shows ``text`` in the info line under the picture; the line ends in an ellipsis where the node is too
   * narrow for it (e.g. "... · queue to update the masks" at the node's default width), and its tooltip is the
   * whole text. */
  setInfo(text) {
    this.info.textContent = text;
    this.info.title = text;
  }

  buildStrip() {
    // a thumbnail removed under the pointer gets no pointerleave: its mask would stay over the picture
    this.hover(null);
    fillStrip(this.strip, this.output, (url) => this.hover(url), (i) => this.chooseMask(i));
  }

  /** A click on the thumbnail of mask ``i``: index outputs it. */
  chooseMask(i) {
    if (this.isStale()) return; // these thumbnails belong to the previous pixel: queue first
    if (isLinked(this.node, "index")) {
      this.setInfo("index comes from a link: clicks on the thumbnails do not change it");
      return;
    }
    setWidget(this.node, "index", i);
    this.sync(true);
    recordChange();
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
    const index = this.currentIndex();
    const more = widget(this.node, "more_points")?.value;
    const indexLinked = isLinked(this.node, "index");
    // a link to more_points changes the pixels marked (the run's, not the widget's text) and the staleness
    const moreLinked = isLinked(this.node, "more_points");
    const key = `${p?.x},${p?.y},${index},${indexLinked},${this.size},${more},${moreLinked}`;
    if (!force && key === this.shown.key) return;
    this.shown.key = key;
    this.updateMarker();
    this.updateInfo();
    const chosen = markChosen(this.strip, index, this.isStale(), indexLinked);
    if (force || chosen !== this.shown.chosen) revealChosen(this.strip);
    this.shown.chosen = chosen;
  }

  /** The index the outline marks: the widget's, or with index fed by a link the one the last run used
   * (NaN before a run, or where no mask contained its pixel: no outline). */
  currentIndex() {
    if (!isLinked(this.node, "index")) return Number(widget(this.node, "index")?.value);
    const used = Number(this.output?.headseg_index?.[0]);
    return used >= 0 ? used : NaN;
  }

  /** A run's UI payload: shown, and (``adopt``) the pixels it mapped onto the masks' grid taken over by
   * the widgets. A node rebuilt by undo gets its last run back with ``adopt`` false: its widgets hold
   * the state undone to, which taking over would edit again (each undo past the run that mapped a pixel
   * would be an edit, and the edits before it could never be undone); the pixels the widgets ask for
   * are named as that run used them all the same (picker_pixels.js). A run that ended while another
   * workflow was open comes back with its tab, ``adopt`` true: the node was never told of it (tick). A run
   * queued from another workflow tab, which ComfyUI hands to the node of the same id in the open one, is
   * left out: it would show that workflow's masks here, and write its frame and pixels into this one.
   * ``fromMessage`` false: a payload taken from the outputs ComfyUI keeps (tick), not one handed over with
   * the 'executed' message of the prompt under way. */
  onExecuted(output, adopt = true, fromMessage = true) {
    if (!output || typeof output !== "object" || otherWorkflowsRun(output, fromMessage)) return;
    this.output = output;
    this.lostRun = false;
    // a run handed over with its message is the prompt's under way, also when an earlier one looked the same
    if (fromMessage || !knownRun(output)) noteRunUpstream(output, this.runUpstreamFile(adopt));
    if (adopt) {
      this.upstreamAtStart = undefined;
      // for when the run is gone (a page reload). Not inside a subgraph that several subgraph nodes use: each
      // prompt hands the node one run per user, whose frames differ when their pictures do, and such a
      // picker shows no upstream picture (it cannot tell whose) to place on a frame
      const framed = executionId(this.node) !== null && pixels.rememberFrame(this.node, output);
      this.adoptMappedPixel();
      pixels.adoptMappedPoints(this.node, this.output);
      // a new frame goes into the saved workflow at once (ComfyUI saves it for a reload when it sees a
      // change), not at the user's next edit: a reload right after the run keeps it. No undo step of its
      // own (it changes nothing on screen): it joins the current one, or the pixels mapped just now
      if (framed) noteOwnChange(this.node);
    }
    this.refreshSource();
    this.buildStrip();
    this.sync(true);
  }

  /** A prompt starts (its 'execution_start'): it segments the picture the upstream node shows now, unless
   * that node runs in it and shows a new one (e.g. a node that previews each run's picture and passes it
   * on), or the one shown when it was queued where this picker saw it queued. Another picture chosen
   * upstream while it waits in the queue or runs is not the run's. */
  onExecutionStart() {
    this.upstreamAtStart = this.upstreamFileNow();
  }

  /** The file the upstream preview shows now (null while it loads the node's latest outputs, or none). */
  upstreamFileNow() {
    return upstreamFileNow(this.node);
  }

  /** The upstream preview file of a run that has reached the picker (null: learned later, see
   * upstreamChangedSince). For a run of the prompt under way (``fromPrompt``) whose upstream node did not
   * run in it, the one shown when the prompt was queued (known where this picker saw it queued) or else
   * started; else the one shown now, unless the upstream preview of the node's latest outputs is still
   * loading (ComfyUI sets node.imgs once its pictures have loaded and the node is drawn, often after this
   * node's own run reached the picker). */
  runUpstreamFile(fromPrompt) {
    const queued = fromPrompt ? shownWhenQueued(this) : undefined;
    const start = fromPrompt ? (queued ?? this.upstreamAtStart) : undefined;
    const origin = upstreamNode(this.node);
    const ran = origin && [executionId(origin), outputKey(origin)].some((id) => id !== null && ranInPrompt(id));
    if (start != null && !ran) return start;
    return upstreamFileNow(this.node);
  }

  /** Widgets that still ask for a pixel the run mapped onto the masks' grid take the pixel it used
   * (picker_pixels.js). */
  adoptMappedPixel() {
    pixels.adoptMappedPixel(this.node, this.output);
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

  /** Whether the upstream node's preview shows another file than it did beside the run of ``output``
   * (e.g. another picture chosen in Load Image): that run's picture is not the one the next run
   * segments. Learns the file when the run's was not known, once the upstream preview shows the node's
   * latest outputs. */
  upstreamChangedSince(output) {
    const now = previewFile(upstreamPreview(this.node));
    if (now === null) return false; // no preview (yet): nothing to compare
    const then = runUpstream(output);
    if (then === null && !upstreamPreviewLoading(this.node)) noteRunUpstream(output, now);
    return then !== null && then !== now;
  }

  /** The picture fed to the node changed since the last run: the picker goes back to showing it as before
   * the first run (its own size, no thumbnails), so the pixel is picked on the picture the next run
   * segments. */
  dropOutdatedRun() {
    this.output = null;
    this.upstreamSrc = undefined; // the next tick shows the upstream preview
    this.buildStrip();
    this.sync(true);
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
    if (this.output && this.upstreamChangedSince(this.output)) this.dropOutdatedRun();
    if (!this.output) {
      const stored = storedOutput(this.node);
      const restorable =
        (stored?.headseg_pixel || stored?.headseg_image) && !isLostRun(stored) && !otherWorkflowsRun(stored, false);
      // a run the node was told of (picker_runs.js knownRun: every one is kept): the node was rebuilt (undo),
      // its widgets are left as they are. One it never was ended while another workflow was open (ComfyUI tells the
      // nodes of the open one) and comes with its tab: taken as it comes, its frame and mapped pixels too
      const told = stored ? knownRun(stored) : false; // before upstreamChangedSince notes it
      if (restorable && !this.upstreamChangedSince(stored)) {
        this.onExecuted(stored, !told, false);
        return;
      }
      const up = upstreamPreview(this.node);
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
