// Runs TokenStrip's front end (argv[2]: the ESM file) against a minimal DOM and model; prints JSON.
const [, , esmPath] = process.argv;
class Element {
  constructor(tag) {
    Object.assign(this, { tag, children: [], style: {}, dataset: {}, listeners: {}, textContent: "" });
    Object.assign(this, { scrollTop: 0, clientHeight: 100, offsetTop: 0, offsetHeight: 20 });
  }
  set innerHTML(_) { this.children = []; }
  appendChild(child) { this.children.push(child); return child; }
  addEventListener(name, fn) { this.listeners[name] = fn; }
}
globalThis.document = {
  createElement: (tag) => new Element(tag),
  createTextNode: (text) => ({ tag: "#text", text }),
};
const state = {
  tokens: [{ text: "def", style: "background: red;", title: "a" },
           { text: "\u21b5\u00b7\u00b7\u00b7x", style: "background: blue;", title: "b" },
           { text: "y\u21b5", style: "background: green;", title: "c" }],
  highlighted: [], selected: -1, hovered: -1,
};
const handlers = {};
const saved = [];
const model = {
  get: (name) => state[name],
  set: (name, value) => { state[name] = value; },
  save_changes: () => saved.push({ selected: state.selected, hovered: state.hovered }),
  on: (event, fn) => { (handlers[event] ||= []).push(fn); },
  off: (event, fn) => { handlers[event] = handlers[event].filter((h) => h !== fn); },
};
const fire = (name, value) => { state[name] = value; handlers["change:" + name].forEach((fn) => fn()); };

const { default: widget } = await import(esmPath);
const el = new Element("div");
const cleanup = widget.render({ model, el });
const [preview, box] = el.children;
const spans = () => box.children.filter((c) => c.tag === "span");
const layout = (span) => span.children.map((c) => (c.tag === "#text" ? c.text : "<" + c.tag + ">"));
const first = spans();
const seen = {
  layout: first.map(layout),
  wbr: box.children.filter((c) => c.tag === "wbr").length,
  indices: first.map((s) => s.dataset.index),
  hint: preview.textContent,
};
first[1].listeners.click();
fire("selected", state.selected);
seen.pinnedStyle = spans().map((s) => s.style.cssText);
seen.marks = spans().map((s) => s.dataset.mark);
seen.sameSpans = spans().every((s, i) => s === first[i]);  // pinning restyles, it does not rebuild
first[0].listeners.mouseenter();
seen.hoverPreview = preview.textContent;
box.listeners.mouseleave();
seen.afterLeave = preview.textContent;
fire("highlighted", [2]);
seen.highlightStyle = spans()[2].style.cssText;
first[2].offsetTop = 500;  // far below the visible 100 px of the box
fire("selected", 2);
seen.scrollTop = box.scrollTop;
fire("tokens", state.tokens.slice(0, 2));
seen.rebuilt = { count: spans().length, scrollTop: box.scrollTop, fresh: spans()[0] !== first[0] };
seen.saved = saved;
cleanup();
seen.listenersLeft = Object.values(handlers).reduce((n, list) => n + list.length, 0);
console.log(JSON.stringify(seen));
