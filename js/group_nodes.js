// HeadSeg front end: Multi K-Means inside a (deprecated) group node. Only exports: ComfyUI loads every .js
// file here as an extension module.
//
// ComfyUI's group nodes give every inner input named "seed" a "control after generate" widget, whatever
// the input asks for (Multi K-Means' seed asks for none: control_after_generate=False). So a group node
// made of a Multi K-Means (Convert to Group Node) took that node's saved values one widget off: the
// control widget got its device ("auto") and device got none (the prompt sent device: null, and the node
// failed after sampling); and a group node placed anew had its k-means seed re-drawn at every queue
// ("randomize", the control's default), so no click reused the cached clusters and the masks changed.

const MULTI_KMEANS = "HeadSeg_MultiKMeans";

/** The config ComfyUI's group node type keeps under a symbol of its nodeData (newToOldWidgetMap: group
 * widget name -> {node: the inner node's data, inputName}), or null for any other node. */
function groupConfig(node) {
  const nodeData = node?.constructor?.nodeData;
  if (!nodeData || typeof nodeData !== "object") return null;
  for (const key of Object.getOwnPropertySymbols(nodeData)) {
    const value = nodeData[key];
    if (value && typeof value === "object" && value.newToOldWidgetMap) return value;
  }
  return null;
}

/** The seed widgets of the Multi K-Means nodes inside group node ``node``: [{control, device}], the
 * control widget ComfyUI linked to the seed and the same inner node's device widget (or null). */
function kmeansSeeds(node) {
  const map = groupConfig(node)?.newToOldWidgetMap;
  if (!map) return [];
  const widgets = new Map((node.widgets ?? []).map((w) => [w.name, w]));
  const entries = Object.entries(map);
  const out = [];
  for (const [name, inner] of entries) {
    if (inner?.node?.type !== MULTI_KMEANS || inner.inputName !== "seed") continue;
    const control = widgets.get(name)?.linkedWidgets?.[0];
    if (!control) continue;
    const same = (other) => other?.node === inner.node || (other?.node?.index ?? -1) === inner.node.index;
    const deviceName = entries.find(([, other]) => same(other) && other.inputName === "device")?.[0];
    out.push({ control, device: deviceName === undefined ? null : widgets.get(deviceName) ?? null });
  }
  return out;
}

/**
 * Repairs the Multi K-Means seeds of group node ``node``: a control widget holding a value that is no
 * control mode took the device's value (the shift described above), which goes back to device when
 * device holds none of its choices; the control is then "fixed". ``fresh``: a node just built, whose
 * control has ComfyUI's default ("randomize"): "fixed" too, as Multi K-Means' own seed is.
 */
export function repairGroupSeeds(node, fresh = false) {
  for (const { control, device } of kmeansSeeds(node)) {
    const modes = control.options?.values ?? [];
    if (!modes.includes(control.value)) {
      const choices = device?.options?.values ?? [];
      if (device && !choices.includes(device.value) && choices.includes(control.value)) device.value = control.value;
      control.value = "fixed";
    } else if (fresh && control.value === "randomize") {
      control.value = "fixed";
    }
  }
}

/** Hooks group node ``node`` holding a Multi K-Means (any other node is left alone) up to repairGroupSeeds: now, when it joins a
 * graph (Convert to Group Node fills its widgets from the inner nodes just before) and after it is loaded
 * from a saved workflow. */
export function setupGroupNode(node) {
  if (!kmeansSeeds(node).length) return;
  repairGroupSeeds(node, true);
  const onAdded = node.onAdded;
  node.onAdded = function () {
    const result = onAdded?.apply(this, arguments);
    repairGroupSeeds(this);
    return result;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    repairGroupSeeds(this);
    return result;
  };
}
