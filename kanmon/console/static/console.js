// The console's one script of its own (no inline scripts: the CSP allows only files
// from the console). It shows the upload progress of the queue restore form, which htmx
// sends; without JavaScript the form still posts and the result page follows.
document.addEventListener("htmx:xhr:progress", function (evt) {
  var form = evt.target;
  if (!form || form.id !== "restore-form" || !evt.detail.lengthComputable) {
    return;
  }
  var bar = document.getElementById("restore-progress");
  var percent = document.getElementById("restore-percent");
  var value = Math.floor((evt.detail.loaded / evt.detail.total) * 100);
  bar.hidden = false;
  bar.value = value;
  percent.textContent = value + " %";
});
document.addEventListener("htmx:responseError", function (evt) {
  if (!evt.target || evt.target.id !== "restore-form") {
    return;
  }
  // A refusal before the restore ran (too large, the session ended): say so by the form.
  var percent = document.getElementById("restore-percent");
  percent.textContent = evt.detail.xhr.status + " " + (evt.detail.xhr.statusText || "");
});
