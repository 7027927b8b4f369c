// HeadSeg front end: the stylesheet of the picker (Mask Select At Pixel) and of the note line (the
// other HeadSeg nodes), added to the page once. Only exports: ComfyUI loads every .js file here as
// an extension module.

export const PICKER_MIN_HEIGHT = 200; // px: picture + info line + thumbnail strip
const STYLE_ID = "headseg-style";

const CSS = `
/* contain: inline-size: the picker's width is its node's, never its content's. In the Vue node renderer (Nodes 2.0)
   the widget sits in a flex item sized no narrower than its content, and the thumbnail strip of a few landscape
   masks (or the frame, sized from the width it was given) made the picker wider than the node. */
.headseg-picker { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; contain: inline-size;
  width: 100%; height: 100%; min-height: ${PICKER_MIN_HEIGHT}px; font: 11px sans-serif; color: var(--input-text, #ddd); overflow: hidden; }
.headseg-stage { position: relative; flex: 1 1 auto; min-height: 60px; display: flex;
  align-items: center; justify-content: center; overflow: hidden;
  background: var(--comfy-input-bg, #222); border-radius: 4px; }
.headseg-frame { position: relative; flex: none; cursor: crosshair; }
.headseg-frame img { position: absolute; inset: 0; width: 100%; height: 100%; display: block;
  user-select: none; -webkit-user-drag: none; pointer-events: none; }
.headseg-frame img.headseg-hover { display: none; }
.headseg-frame.headseg-hovering img.headseg-hover { display: block; }
.headseg-marker { position: absolute; width: 0; height: 0; pointer-events: none; display: none; }
.headseg-marker::before, .headseg-marker::after { content: ""; position: absolute; background: #ff2d55;
  box-shadow: 0 0 0 1px rgba(255, 255, 255, 0.85); }
.headseg-marker::before { left: -9px; top: -1px; width: 18px; height: 2px; }
.headseg-marker::after { left: -1px; top: -9px; width: 2px; height: 18px; }
.headseg-rings { position: absolute; inset: 0; pointer-events: none; }
/* 10 px + 2 px borders, centred by the -7 px margin: content-box, as ComfyUI's page sizes elements border-box */
.headseg-ring { position: absolute; box-sizing: content-box; width: 10px; height: 10px; margin: -7px 0 0 -7px;
  border: 2px solid #34c759; border-radius: 50%; box-shadow: 0 0 0 1px rgba(0, 0, 0, 0.6); pointer-events: none; }
.headseg-ring.headseg-ring-out { border-color: #ff3b30; }
.headseg-message { padding: 8px; text-align: center; opacity: 0.75; line-height: 1.4; }
.headseg-info { flex: none; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; opacity: 0.85; }
.headseg-strip { flex: none; position: relative; display: flex; gap: 4px; overflow-x: auto; overflow-y: hidden; height: 62px; }
.headseg-strip:empty { display: none; }
.headseg-strip.headseg-stale { opacity: 0.45; }
.headseg-thumb { flex: none; position: relative; height: 52px; padding: 0; margin: 0; cursor: pointer;
  border: 2px solid transparent; border-radius: 3px; background: #111; }
.headseg-thumb img { height: 100%; display: block; pointer-events: none; }
.headseg-thumb span { position: absolute; left: 2px; bottom: 1px; font-size: 10px; color: #fff;
  text-shadow: 0 0 2px #000; pointer-events: none; }
.headseg-thumb.headseg-selected { border-color: #ff2d55; }
/* A word longer than the line (a saved file's path) breaks anywhere: it was cut at the node's edge on the canvas,
   and in the Vue node renderer it made the note wider than the node (contain: inline-size: the node's width). */
.headseg-note { box-sizing: border-box; width: 100%; height: 100%; overflow: hidden; padding: 2px 4px;
  font: 11px sans-serif; line-height: 1.35; white-space: pre-line; overflow-wrap: anywhere; contain: inline-size;
  color: var(--input-text, #ddd); opacity: 0.85; }
`;

export function addStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}
