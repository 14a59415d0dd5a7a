// Runs TokenStrip's front-end (argv[2]: the ESM file) against a minimal DOM and model; prints JSON.
const [, , esmPath] = process.argv;
class Element {
  constructor(tag) { this.tag = tag; this.children = []; this.style = {}; this.listeners = {}; this.textContent = ""; }
  set innerHTML(_) { this.children = []; }
  appendChild(child) { this.children.push(child); return child; }
  addEventListener(name, fn) { this.listeners[name] = fn; }
}
globalThis.document = { createElement: (tag) => new Element(tag) };
const state = {
  tokens: [{ text: "def", color: "red", title: "a", hard: true, dim: false },
           { text: "·f\u21b5", color: "blue", title: "b", hard: false, dim: true }],
  highlighted: [1], selected: -1, hovered: -1,
};
const handlers = {};
const saved = [];
const model = {
  get: (name) => state[name],
  set: (name, value) => { state[name] = value; },
  save_changes: () => saved.push({ selected: state.selected, hovered: state.hovered }),
  on: (event, fn) => { handlers[event] = fn; },
};
const { default: widget } = await import(esmPath);
const el = new Element("div");
widget.render({ model, el });
const spans = () => el.children[0].children.filter((c) => c.tag === "span");
const first = spans();
first[1].listeners.click();
first[0].listeners.mouseenter();
handlers["change:selected"]();
const redrawn = spans();
console.log(JSON.stringify({
  texts: first.map((s) => s.textContent),
  breaks: el.children[0].children.filter((c) => c.tag === "br").length,
  hardBorder: first[0].style.borderBottom || null,
  dimOpacity: first[1].style.opacity || null,
  outlined: first.map((s) => Boolean(s.style.outline)),
  saved,
  selectedShadow: redrawn.map((s) => Boolean(s.style.boxShadow)),
}));
