"""A strip of coloured tokens that reports clicks and hovers back to Python (an anywidget)."""

from __future__ import annotations

import anywidget
import traitlets

_ESM = """
function render({ model, el }) {
  function draw() {
    el.innerHTML = "";
    const wrap = document.createElement("div");
    wrap.style.cssText = "font-family: monospace; line-height: 1.9; max-height: 420px; overflow-y: auto;";
    const highlighted = new Set(model.get("highlighted"));
    const selected = model.get("selected");
    model.get("tokens").forEach((token, i) => {
      const span = document.createElement("span");
      span.textContent = token.text;
      span.title = token.title;
      span.style.cssText = "white-space: pre; cursor: pointer; padding: 1px 0; background: " + token.color + ";";
      if (token.dim) span.style.opacity = "0.35";
      if (token.hard) span.style.borderBottom = "2px solid #222";
      if (highlighted.has(i)) span.style.outline = "2px solid #d62728";
      if (i === selected) span.style.boxShadow = "0 0 0 2px #1f77b4";
      span.addEventListener("click", () => { model.set("selected", i); model.save_changes(); });
      span.addEventListener("mouseenter", () => { model.set("hovered", i); model.save_changes(); });
      wrap.appendChild(span);
      if (token.text.endsWith("\\u21b5")) wrap.appendChild(document.createElement("br"));
    });
    el.appendChild(wrap);
  }
  for (const name of ["tokens", "highlighted", "selected"]) model.on("change:" + name, draw);
  draw();
}
export default { render };
"""


class TokenStrip(anywidget.AnyWidget):
    """tokens: [{text, color, title, hard, dim}]; `selected` / `hovered` are indices set by the browser."""

    _esm = _ESM
    tokens = traitlets.List([]).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    hovered = traitlets.Int(-1).tag(sync=True)
    highlighted = traitlets.List([]).tag(sync=True)
