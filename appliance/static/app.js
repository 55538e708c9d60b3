// Morgana web UI: the little that plain HTML and htmx do not do.
// Forms with data-confirm ask before a destructive action is sent.
document.addEventListener("submit", function (e) {
  var message = e.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) {
    e.preventDefault();
  }
}, true);
