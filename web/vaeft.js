// Show the text this pack's output nodes return (ui "text": where Save Fine-tuned VAE wrote its file, VAE
// Evaluate's metrics table) in a read-only box on the node. ComfyUI's frontend draws returned text only
// for its own Preview Any; this does the same for our output nodes, whatever text they return.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

// Served as /extensions/<pack folder>/vaeft.js; ComfyUI names our nodes' module custom_nodes.<pack folder>.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);
const RESULT = "result";

app.registerExtension({
  name: "vaeft.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.output_node || nodeData.python_module !== `custom_nodes.${PACK}`) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // Made with the node (not on the first result) so the node's size does not jump after a run.
      const widget = ComfyWidgets.STRING(this, RESULT, ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.element.placeholder = "the result shows here after a run";
      widget.serialize = false; // not saved in the workflow's widgets_values
      widget.options.serialize = false; // not sent as an input of the prompt
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
