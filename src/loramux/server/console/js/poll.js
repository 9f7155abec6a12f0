// Runs `task` now and then every `ms` milliseconds after it settles, skipping while the tab is
// hidden or `when()` is false. `now()` asks for a run at once (after the current one, if any).
// Failures are the task's to show; api.js reports the connection's state.
export function poll(task, ms, when = () => true) {
  let timer = null;
  let running = false;
  let again = false;
  const run = async () => {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      if (!document.hidden && when()) await task();
    } catch (error) {
      console.debug("poll:", error.message);
    } finally {
      running = false;
      timer = setTimeout(run, again ? 0 : ms);
      again = false;
    }
  };
  run();
  return { now: run };
}
