// The console's entry point: the views, the hash router, the token form and the connection banner.

import { hasStoredToken, onConnection, setToken } from "./api.js";
import { startDigitsView } from "./digits.js";
import { startGeneratorView } from "./generator.js";
import { startModelsView } from "./models.js";
import { startScenesView } from "./scenes.js";

const VIEWS = ["models", "digits", "generator", "scenes"];

function showView() {
  const wanted = location.hash.slice(1);
  const view = VIEWS.includes(wanted) ? wanted : "models";
  for (const name of VIEWS) {
    document.getElementById(`view-${name}`).hidden = name !== view;
  }
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function startTokenForm() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  const keep = document.getElementById("token-keep");
  keep.checked = hasStoredToken();
  if (keep.checked) input.placeholder = "kept for this tab";
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim(), keep.checked);
  });
}

/** The banner: the server cannot be reached, or it refuses the token (its own message). */
function startConnectionBanner() {
  const banner = document.getElementById("connection");
  onConnection(({ reachable, status, message }) => {
    if (!reachable) {
      banner.textContent = message;
      banner.hidden = false;
    } else if (status === 401) {
      banner.textContent = `The server refused the call: ${message}. Enter a token above.`;
      banner.hidden = false;
    } else if (status < 400) {
      banner.hidden = true;
    }
  });
}

startConnectionBanner();
startTokenForm();
window.addEventListener("hashchange", showView);
showView();
startModelsView();
startDigitsView();
startGeneratorView();
startScenesView();
