"""A strip of coloured tokens laid out as the text is, reporting clicks and hovers to Python (an anywidget).

Python decides every colour (`token["style"]`); the front end only lays tokens out, marks the
pinned and highlighted ones and reports the mouse. A newline anywhere inside a token (shown as
↵) breaks the line right there, so `↵···` starts a new line indented by three spaces; long
lines wrap between tokens (and inside a token only when one alone is wider than the box).
"""

from __future__ import annotations

import html
import json

import anywidget
import traitlets

NEWLINE = "↵"
BOX_CSS = ("position: relative; box-sizing: border-box; max-width: 100%; max-height: 420px; overflow-y: auto;"
           " overflow-x: hidden; padding: 6px 8px; background: #ffffff; color: #111111; font-family: monospace;"
           " line-height: 2; white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #d0d0d0;")
PREVIEW_CSS = ("box-sizing: border-box; height: 1.9em; line-height: 1.9em; padding: 0 8px; overflow: hidden;"
               " white-space: nowrap; text-overflow: ellipsis; font-family: monospace; background: #f4f4f4;"
               " color: #111111;")
PINNED_CSS = "outline: 3px solid #111111; outline-offset: 1px;"
HIGHLIGHT_CSS = "outline: 2px dashed #1e3a8a; outline-offset: 0;"
PREVIEW_HINT = "hover a token for a quick look; click it to pin its details below"

_ESM = """
const STYLE = __STYLE__;
const NEWLINE = "\\u21b5";

function tokenSpan(token, index) {
  const span = document.createElement("span");
  span.dataset.index = String(index);
  span.title = token.title;
  span.style.cssText = token.style;
  token.text.split(NEWLINE).forEach((part, j, parts) => {
    if (part) span.appendChild(document.createTextNode(part));
    if (j < parts.length - 1) {
      span.appendChild(document.createTextNode(NEWLINE));
      span.appendChild(document.createElement("br"));
    }
  });
  return span;
}

function render({ model, el }) {
  const preview = document.createElement("div");
  preview.className = "kdviz-strip-preview";
  preview.style.cssText = STYLE.preview;
  const box = document.createElement("div");
  box.className = "kdviz-strip";
  box.style.cssText = STYLE.box;
  el.appendChild(preview);
  el.appendChild(box);
  let spans = [];

  function describe(prefix, index) {
    const token = model.get("tokens")[index];
    return token ? prefix + ": " + token.text + "  \\u2014  " + token.title : STYLE.hint;
  }
  function showPinned() { preview.textContent = describe("pinned", model.get("selected")); }

  function decorate() {
    const highlighted = new Set(model.get("highlighted"));
    const selected = model.get("selected");
    spans.forEach((span, i) => {
      span.dataset.mark = i === selected ? "pinned" : highlighted.has(i) ? "highlighted" : "";
      span.style.cssText = model.get("tokens")[i].style + (STYLE[span.dataset.mark] || "");
    });
    showPinned();
  }
  function reveal() {
    const span = spans[model.get("selected")];
    if (!span) return;
    const top = span.offsetTop, bottom = top + span.offsetHeight;
    if (top < box.scrollTop || bottom > box.scrollTop + box.clientHeight) {
      box.scrollTop = Math.max(0, top - box.clientHeight / 3);
    }
  }
  function later(fn) { (globalThis.requestAnimationFrame || ((f) => f()))(fn); }
  function build() {
    box.innerHTML = "";
    spans = model.get("tokens").map((token, i) => {
      const span = tokenSpan(token, i);
      span.addEventListener("click", () => { model.set("selected", i); model.save_changes(); });
      span.addEventListener("mouseenter", () => {
        preview.textContent = describe("hover", i);
        model.set("hovered", i);
        model.save_changes();
      });
      box.appendChild(span);
      box.appendChild(document.createElement("wbr"));
      return span;
    });
    box.scrollTop = 0;
    decorate();
    later(reveal);
  }
  box.addEventListener("mouseleave", () => {
    showPinned();
    model.set("hovered", -1);
    model.save_changes();
  });

  const onTokens = () => build();
  const onSelected = () => { decorate(); later(reveal); };
  const onHighlighted = () => decorate();
  model.on("change:tokens", onTokens);
  model.on("change:selected", onSelected);
  model.on("change:highlighted", onHighlighted);
  build();
  return () => {
    model.off("change:tokens", onTokens);
    model.off("change:selected", onSelected);
    model.off("change:highlighted", onHighlighted);
  };
}
export default { render };
"""


class TokenStrip(anywidget.AnyWidget):
    """tokens: [{text, style, title, ...}]; `selected` (the pinned token) and `hovered` are indices.

    The browser sets `selected` on a click and `hovered` while the mouse is over a token (-1 off
    the strip); Python sets `selected` and `highlighted` (outlined tokens) to point at tokens.
    """

    _esm = _ESM.replace("__STYLE__", json.dumps({"box": BOX_CSS, "preview": PREVIEW_CSS, "pinned": PINNED_CSS,
                                                 "highlighted": HIGHLIGHT_CSS, "hint": PREVIEW_HINT}))
    tokens = traitlets.List([]).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    hovered = traitlets.Int(-1).tag(sync=True)
    highlighted = traitlets.List([]).tag(sync=True)

    def static_html(self) -> str:
        """The strip as self-contained HTML: same layout and colours, pinned and highlighted tokens marked."""
        highlighted = set(self.highlighted)
        spans = []
        for i, token in enumerate(self.tokens):
            mark = PINNED_CSS if i == self.selected else HIGHLIGHT_CSS if i in highlighted else ""
            text = f"{NEWLINE}<br>".join(html.escape(part) for part in token["text"].split(NEWLINE))
            spans.append(f'<span style="{token["style"]}{mark}" title="{html.escape(token["title"])}">{text}</span>')
        return f'<div class="kdviz-strip" style="{BOX_CSS}">{"<wbr>".join(spans)}</div>'
