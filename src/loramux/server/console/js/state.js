// What the panels share: the server's models (the models panel refreshes them), announced to
// the panels that list them.
export const models = {
  list: [],
  events: new EventTarget(),
  set(list) {
    this.list = list;
    this.events.dispatchEvent(new Event("change"));
  },
  get base() {
    return this.list.find((m) => m.parent == null)?.id;
  },
};
