// Show the text this pack's output nodes return (ui "text": where Save Fine-tuned VAE wrote its file, VAE
// Evaluate's metrics table) in a read-only box on the node. ComfyUI's frontend draws returned text only
// for its own Preview Any; this does the same for our output nodes, whatever text they return.
//
// Only the public surface is used: `app` from scripts/app.js (public in every frontend; newer ones print an
// "internal module" notice for the other scripts/*.js, such as widgets.js) and the node's own
// `addDOMWidget` (a textarea, as ComfyUI's multi-line STRING widget makes it). A frontend whose nodes lack
// addDOMWidget falls back to the page's `window.comfyAPI.widgets`, never to an internal import.
import { app } from "../../scripts/app.js";

// Served as /extensions/<pack folder>/vaeft.js; ComfyUI names our nodes' module custom_nodes.<pack folder>.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);
const RESULT = "result";
const PLACEHOLDER = "the result shows here after a run";

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
    return widget;
  }
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input";
  el.readOnly = true;
  el.placeholder = PLACEHOLDER;
  el.spellcheck = false;
  const widget = node.addDOMWidget(RESULT, "customtext", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
  });
  widget.inputEl = el;
  widget.options.minNodeSize = [400, 200]; // what the frontend gives its own multi-line text box
  return widget;
}

app.registerExtension({
  name: "vaeft.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.output_node || nodeData.python_module !== `custom_nodes.${PACK}`) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // Made with the node (not on the first result) so the node's size does not jump after a run.
      const widget = addResultBox(this);
      if (widget) {
        widget.serialize = false; // not saved in the workflow's widgets_values
        widget.options.serialize = false; // not sent as an input of the prompt
      }
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === RESULT);
      if (widget && message?.text) widget.value = [].concat(message.text).join("\n");
    };
  },
});
