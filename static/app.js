// The app's few behaviours beyond htmx, as listeners (the Content-Security-Policy allows no inline script).
document.addEventListener("change", (event) => {
  // a picker that submits its form as soon as a choice is made (the template picker)
  if (event.target.matches("select[data-submit-on-change]")) event.target.form.submit();
});
document.addEventListener("click", (event) => {
  // "Use l1_alpha = …": copy a value into a form field and let the live hints react
  const button = event.target.closest("[data-fill-field]");
  if (!button) return;
  const field = document.getElementById(button.dataset.fillField);
  if (!field) return;
  field.value = button.dataset.fillValue;
  field.dispatchEvent(new Event("input", { bubbles: true }));
});
