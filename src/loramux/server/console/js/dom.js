// Small DOM and formatting helpers shared by the panels.

// h("td", {className: "x", onclick}, "text", otherNode): an element with properties and children
// (strings become text nodes, so server data is never parsed as HTML).
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith("data-") || name.startsWith("aria-")) element.setAttribute(name, value);
    else element[name] = value;
  }
  element.append(...children.flat().filter((c) => c != null));
  return element;
}

// Shows a message in a form's [role=alert] element; an empty string hides it.
export function say(element, message, kind = "error") {
  element.textContent = message;
  element.dataset.kind = kind;
}

export function duration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export const number = (value, digits = 3) => (value == null ? "—" : Number(value).toPrecision(digits));

// Runs `render` (which replaces what `container` holds) and gives the focus back to the new
// element with the same data-key as the focused one, so that refreshes do not lose the keyboard.
export function keepFocus(container, render) {
  const key = container.contains(document.activeElement) ? document.activeElement.dataset.key : undefined;
  render();
  if (key) container.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}
