// The API key, when the server asks for one: every API call goes through apiFetch, which sends the
// key as `Authorization: Bearer` and, on a 401, asks for it once (one dialog, however many calls were
// refused at the same moment), keeps it for this tab only (sessionStorage), and retries. The key
// travels in a header only, never in a URL (URLs end up in logs and history).

const STORAGE_KEY = "canvas-serve.api-key";
let asking = null; // the dialog's promise while it is open, shared by every refused call

export function storedKey() {
  return sessionStorage.getItem(STORAGE_KEY);
}

// fetch(path, init) with the key; on 401, ask for a key and send the call again with it.
export async function apiFetch(path, init = {}) {
  for (;;) {
    const key = storedKey();
    const headers = new Headers(init.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    if (storedKey() === key) await askForKey(key !== null); // else another call has a newer key already
  }
}

function askForKey(refused) {
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById("api-key-dialog");
    const input = dialog.querySelector("input[name=api-key]");
    dialog.querySelector("[data-field=api-key-hint]").textContent = refused
      ? "The server refused that key: enter a valid one."
      : "This server needs an API key.";
    input.value = "";
    dialog.oncancel = (event) => event.preventDefault(); // Escape: there is no way on without a key
    dialog.querySelector("form").addEventListener(
      "submit",
      (event) => {
        event.preventDefault();
        sessionStorage.setItem(STORAGE_KEY, input.value.trim());
        dialog.close();
        asking = null;
        resolve();
      },
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
  return asking;
}
