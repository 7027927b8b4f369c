// HeadSeg front end: tolerant loading of the number widgets (INT and FLOAT inputs) and text widgets
// (STRING inputs) of HeadSeg nodes saved in older or damaged layouts. Only exports: ComfyUI loads every .js file here as an
// extension module.

function finiteOr(value, fallback) {
  const n = Number(value);
  return Number.isFinite(n) ? n : fallback;
}

/** name -> {int, default, min, max} for the INT and FLOAT inputs of a node definition. */
export function numberSpecs(nodeData) {
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
 * number becomes the input's default; numbers are rounded (INT) and clamped to the input's range,
 * and -0 becomes 0: a file holding -0.0 (Python's json writes a negative zero so; JSON.parse keeps
 * it) loaded as -0, which the Vue node renderer (Nodes 2.0) shows as "-0".
 */
export function repairNumberWidgets(node, info, specs) {
  repairWidgets(node, info, specs, (raw, spec) => {
    const numeric =
      (typeof raw === "number" && Number.isFinite(raw)) ||
      (typeof raw === "string" && raw.trim() !== "" && Number.isFinite(Number(raw)));
    let value = numeric ? Number(raw) : spec.default;
    if (spec.int) value = Math.round(value);
    value = Math.min(spec.max, Math.max(spec.min, value));
    return value === 0 ? 0 : value; // -0 === 0: this is +0
  });
}

/** name -> {default} for the STRING inputs of a node definition. */
export function textSpecs(nodeData) {
  const specs = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
      if (!Array.isArray(spec) || spec[0] !== "STRING") continue;
      const fallback = spec[1]?.default;
      specs[name] = { default: typeof fallback === "string" ? fallback : "" };
    }
  }
  return specs;
}

/**
 * As repairNumberWidgets for the text widgets: a saved value that is neither text nor a finite number
 * becomes the input's default, a number its text. E.g. a layout that saved a value for Mask Select's
 * picker after index puts it into more_points (added in 0.5.0), which ComfyUI would send as
 * "{'picker': ...}" and the node refuse when queued.
 */
export function repairTextWidgets(node, info, specs) {
  repairWidgets(node, info, specs, (raw, spec) => {
    if (typeof raw === "string") return raw;
    return typeof raw === "number" && Number.isFinite(raw) ? String(raw) : spec.default;
  });
}

/** Sets each widget named in specs to fix(saved value, its spec): the value saved for it in
 * info.widgets_values (by position among the serialised widgets), else its current value. */
function repairWidgets(node, info, specs, fix) {
  const saved = Array.isArray(info?.widgets_values) ? info.widgets_values : null;
  const widgets = (node.widgets ?? []).filter((w) => w.serialize !== false);
  widgets.forEach((w, i) => {
    const spec = specs[w.name];
    if (!spec) return;
    const value = fix(saved && i < saved.length ? saved[i] : w.value, spec);
    if (!Object.is(w.value, value)) w.value = value; // (-0 !== 0 is false)
  });
}
