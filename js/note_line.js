// HeadSeg front end: the note line under the HeadSeg nodes other than Mask Select At Pixel (the
// node's result text and, on Multi K-Means, the k of the colour map shown), kept across the
// rebuild that undo does. Only exports: ComfyUI loads every .js file here as an extension module.

import { el } from "./dom_helpers.js";
import { storedOutput } from "./graph_helpers.js";
import { noteOwnChange } from "./own_changes.js";
import { addStyle } from "./styles.js";

const NOTE_WIDGET = "headseg_note";
// The note's text: 11 px lines (styles.js .headseg-note) between 2 px of padding above and below; a note
// longer than NOTE_MAX_LINES lines is cut there (the whole text is its tooltip).
const NOTE_LINE = 11 * 1.35;
const NOTE_PADDING = 4;
const NOTE_MAX_LINES = 6;
// The margin ComfyUI's canvas leaves above and below a DOM widget's element (BaseDOMWidgetImpl's default).
const DOM_WIDGET_MARGIN = 10;

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
    this.textEl = el("div", "headseg-note-text", this.root);
    // At most NOTE_MAX_LINES lines: the canvas gives the widget no more height (getMaxHeight), but the Vue node
    // renderer (Nodes 2.0) sizes the element by its content, and a note of 20 lines took 20 lines' height there
    this.textEl.style.maxHeight = `${NOTE_MAX_LINES * NOTE_LINE}px`;
    this.textEl.style.overflow = "hidden";
    this.textBox = 0; // the text's height as the page lays it out (0: not laid out yet)
    // A new text, or a new width that wraps it anew, changes the height the node must give the note.
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver((entries) => {
        const height = entries[entries.length - 1]?.contentRect?.height ?? 0;
        if (height > 0 && height !== this.textBox) {
          this.textBox = height;
          this.node.setDirtyCanvas?.(true, true);
        }
      });
      this.resizeObserver.observe(this.textEl);
    }
  }

  attach() {
    if (this.widget) return;
    this.widget = this.node.addDOMWidget(NOTE_WIDGET, "headseg-note", this.root, {
      serialize: false,
      hideOnZoom: true,
      // not listed in the side panel's inputs (1.58's right side panel), where it had nothing to edit; older
      // frontends (1.32.9) have no such panel and ignore the option
      hideInPanel: true,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => this.minHeight(),
      getMaxHeight: () => Math.max(64, this.minHeight()),
    });
    this.widget.serialize = false;
    const min = this.node.computeSize?.();
    if (!min || (this.node.size[0] >= min[0] && this.node.size[1] >= min[1])) return;
    this.node.setSize([Math.max(this.node.size[0], min[0]), Math.max(this.node.size[1], min[1])]);
    noteOwnChange(this.node); // no undo step of its own: the node grows again when undo rebuilds it
  }

  onExecuted(output) {
    if (!output || typeof output !== "object") return;
    this.text = Array.isArray(output.text) ? output.text.map(String) : [];
    this.labels = Array.isArray(output.headseg_labels) ? output.headseg_labels.map(String) : null;
    if (this.text.length || this.labels?.length) this.attach();
    this.tick(true);
  }

  /** The widget's height (graph units) that shows every line of the note, up to NOTE_MAX_LINES. The classic
   * canvas draws a DOM widget's element 2 x its margin shorter than the widget: a fixed minimum (34) left the
   * note 14 px, less than one line, on the nodes whose picture preview takes the rest of the node (Head PCA,
   * Multi K-Means, Save Label Maps), and their second line was hidden. The Vue node renderer (Nodes 2.0)
   * leaves no margin. */
  minHeight() {
    const margin = globalThis.LiteGraph?.vueNodesMode ? 0 : (this.widget?.margin ?? DOM_WIDGET_MARGIN);
    return 2 * margin + NOTE_PADDING + Math.min(this.textHeight(), NOTE_MAX_LINES * NOTE_LINE);
  }

  /** The text's height as the page lays it out at the element's width (layout px = graph units: the canvas
   * zoom is a transform); until it is laid out, one line per line of the text. */
  textHeight() {
    if (this.textBox > 0) return this.textBox;
    return Math.max(1, (this.shown ?? "").split("\n").length) * NOTE_LINE;
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
    this.textEl.textContent = text;
    this.root.title = text;
  }
}

export function setupNoteLine(nodeType) {
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
