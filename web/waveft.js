// WaveFT nodes in the ComfyUI page (loaded from the pack's WEB_DIRECTORY by every frontend since 2024).
import { app } from "../../scripts/app.js";

function showText(node, name, text) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = node.addWidget("text", name, "", () => {}, { serialize: false });
    widget.serialize = false; // not part of the saved workflow, nor of the prompt
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "WaveFT.Nodes",
  // The training seed picks the run that re-queueing continues: the page must not change it unasked.
  // Frontends add a "control after generate" widget to every INT named seed and default it to randomize.
  nodeCreated(node) {
    if (node.comfyClass !== "WaveFTTrain") return;
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "WaveFTSave" && nodeData.name !== "WaveFTTrain") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const saved = message?.saved_path ?? message?.text;
      if (saved?.length) showText(this, "saved", saved.join("\n"));
      return result;
    };
  },
});
