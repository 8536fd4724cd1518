// Two read-only boxes on this pack's nodes:
// - the result box of our output nodes: the text they return (ui "text": where Save Fine-tuned VAE wrote its
//   file, VAE Evaluate's metrics table). ComfyUI's frontend draws returned text only for its own Preview Any.
// - the training nodes' status box (VAE Fine-tune, VAE Distil Decoder): the run, step, losses and validation while
//   it trains (the server's
//   "vaeft.status" websocket event, nodes/finetune.py STATUS_EVENT), made with the node and sized for the
//   whole text, so every frontend shows all of it and keeps the last one after the run.
//
// Only the public surface is used: `app` from scripts/app.js (public in every frontend; newer ones print an
// "internal module" notice for the other scripts/*.js, such as widgets.js), its `api`, and the node's own
// `addDOMWidget` (a textarea, as ComfyUI's multi-line STRING widget makes it). A frontend whose nodes lack
// addDOMWidget falls back to the page's `window.comfyAPI.widgets`, never to an internal import.
import { app } from "../../scripts/app.js";

// Served as /extensions/<pack folder>/vaeft.js; ComfyUI names our nodes' module custom_nodes.<pack folder>.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);
const RESULT = "result";
const PLACEHOLDER = "the result shows here after a run";
const STATUS = "status";
const STATUS_EVENT = "vaeft.status";
// Seven lines: the run, step and ETA, the losses, validation beside the base (two or three lines when it
// wraps), peak GPU memory. example_workflows/build_ui_workflow.py STATUS_LINES leaves this room on the node.
// VAE Distil Decoder: eleven, its validation has the student against the teacher beside it against the images.
const STATUS_LINE_PX = 14;
const STATUS_LINES = { VAEFTFineTune: 7, VAEFTDistilDecoder: 11 }; // build_ui_workflow.py STATUS_LINES
const STATUS_NODES = Object.keys(STATUS_LINES);
const statusHeight = (type) => STATUS_LINES[type] * STATUS_LINE_PX + 12; // + padding and border

function textBox(node, name, placeholder, options = {}) {
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input";
  el.readOnly = true;
  el.placeholder = placeholder;
  el.spellcheck = false;
  const widget = node.addDOMWidget(name, "customtext", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
    ...options,
  });
  widget.inputEl = el;
  widget.serialize = false; // not saved in the workflow's widgets_values
  widget.options.serialize = false; // not sent as an input of the prompt
  return widget;
}

function addResultBox(node) {
  if (typeof node.addDOMWidget !== "function") {
    const STRING = window.comfyAPI?.widgets?.ComfyWidgets?.STRING;
    if (!STRING) {
      console.error("[vaeft] this ComfyUI frontend offers no way to add a text box: results show in the log only");
      return null;
    }
    const widget = STRING(node, RESULT, ["STRING", { multiline: true }], app).widget;
    widget.element.readOnly = true;
    widget.element.placeholder = PLACEHOLDER;
    widget.serialize = false;
    widget.options.serialize = false;
    return widget;
  }
  const widget = textBox(node, RESULT, PLACEHOLDER);
  widget.options.minNodeSize = [400, 200]; // what the frontend gives its own multi-line text box
  return widget;
}

function addStatusBox(node, type) {
  if (typeof node.addDOMWidget !== "function") return null; // such a frontend: the status is in the log
  // As tall as its lines whatever room the node has (a taller node gives its images the rest); lines
  // wrap at the node's width rather than run past its edge.
  const height = statusHeight(type);
  const widget = textBox(node, STATUS, "the status shows here while it trains",
                         { getMinHeight: () => height, getMaxHeight: () => height });
  Object.assign(widget.inputEl.style, {
    fontSize: "11px", lineHeight: `${STATUS_LINE_PX}px`, padding: "4px 6px", whiteSpace: "pre-wrap",
    overflowWrap: "anywhere", resize: "none",
  });
  return widget;
}

function statusNode(id) {
  // a node of the graph on screen, or of the whole workflow (an id "a:b" names a node inside a subgraph)
  const graphs = [app.graph, app.canvas?.graph].filter(Boolean);
  for (const key of [id, id.split(":").pop()]) {
    for (const graph of graphs) {
      const node = graph.getNodeById?.(key);
      if (STATUS_NODES.includes(node?.type)) return node;
    }
  }
  return null;
}

app.registerExtension({
  name: "vaeft.ResultText",
  async setup() {
    const api = app.api ?? window.comfyAPI?.api?.api;
    api?.addEventListener(STATUS_EVENT, ({ detail }) => {
      const widget = statusNode(String(detail?.node ?? ""))?.widgets?.find((w) => w.name === STATUS);
      if (widget) widget.value = String(detail.text ?? "");
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.python_module !== `custom_nodes.${PACK}`) return;
    const status = STATUS_NODES.includes(nodeData.name);
    if (!nodeData.output_node && !status) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // Made with the node (not on the first result) so the node's size does not jump after a run; the status
      // box (a fixed height) right under the widgets, then the result box (VAE Distil Decoder has both).
      if (status) addStatusBox(this, nodeData.name);
      if (nodeData.output_node) addResultBox(this);
      return r;
    };

    if (!nodeData.output_node) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === RESULT);
      if (widget && message?.text) widget.value = [].concat(message.text).join("\n");
    };
  },
});
