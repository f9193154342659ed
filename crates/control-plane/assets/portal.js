// Copies the license token to the clipboard. The page works without it: the token is in a
// read-only text box that can be selected by hand.
document.addEventListener("DOMContentLoaded", function () {
  var button = document.getElementById("copy-token");
  var box = document.getElementById("token");
  if (!button || !box) return;
  button.hidden = false;
  button.addEventListener("click", function () {
    box.select();
    if (navigator.clipboard) { navigator.clipboard.writeText(box.value); } else { document.execCommand("copy"); }
    button.textContent = "Copied";
  });
});
