/* The annotation app's keyboard and small conveniences (services/web.py serves it as /assets/illume.js).
 *
 * It only changes the judging form and submits it: every action also has a button, so the pages work
 * with script off. Keys (documented on the page): 1-9, 0 toggle candidates 1-10 and focus them;
 * Up/Down or J/K move the focus; R then 1-4 rates the focused candidate; A toggles "the answer is
 * wrong"; C opens the correction box (Esc closes it; keys typed in it are text); Enter submits;
 * N submits "none fits"; S skips; U undoes the last submission.
 */
(function () {
  "use strict";

  var CANDIDATE_KEYS = "1234567890";

  function byId(id) {
    return document.getElementById(id);
  }

  function isTyping(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select") return true;
    if (tag === "input") {
      var type = (target.type || "").toLowerCase();
      return ["checkbox", "radio", "button", "submit", "hidden"].indexOf(type) < 0;
    }
    return !!target.isContentEditable;
  }

  function submitWith(form, button) {
    if (!form || !button) return;
    if (form.dataset.submitted === "1") return; // one judgement per page, however fast the keys
    form.dataset.submitted = "1";
    if (typeof form.requestSubmit === "function") {
      form.requestSubmit(button);
    } else {
      button.click();
    }
  }

  function setupNamespaceSelector() {
    var select = byId("namespace-select");
    if (select) {
      select.addEventListener("change", function () {
        select.form.submit();
      });
    }
  }

  function setupJudging(form) {
    var candidates = Array.prototype.slice.call(form.querySelectorAll("li.candidate"));
    var status = byId("key-status");
    var correctionBox = byId("correction-box");
    var correction = byId("correction");
    var focused = candidates.length ? 0 : -1;
    var ratingPending = false;

    function say(text) {
      if (status) status.textContent = text;
    }

    function showFocus() {
      candidates.forEach(function (li, i) {
        li.classList.toggle("focused", i === focused);
        if (i === focused) li.setAttribute("aria-current", "true");
        else li.removeAttribute("aria-current");
      });
      if (focused >= 0) candidates[focused].scrollIntoView({ block: "nearest" });
    }

    function focusCandidate(i) {
      if (i < 0 || i >= candidates.length) return;
      focused = i;
      showFocus();
      candidates[i].focus({ preventScroll: true });
    }

    function toggleCandidate(i) {
      if (i < 0 || i >= candidates.length) return;
      var box = candidates[i].querySelector("input[type=checkbox]");
      box.checked = !box.checked;
      candidates[i].classList.toggle("checked", box.checked);
      focusCandidate(i);
    }

    function rateFocused(value) {
      if (focused < 0) return;
      var radio = candidates[focused].querySelector('input[type=radio][data-rating="' + value + '"]');
      if (radio) {
        radio.checked = true;
        say("Rated candidate " + (focused + 1) + ": " + value);
      }
    }

    function openCorrection() {
      if (!correctionBox) return;
      correctionBox.open = true;
      correction.focus();
    }

    function closeCorrection() {
      if (!correctionBox) return;
      correctionBox.open = false;
      correction.blur();
    }

    candidates.forEach(function (li, i) {
      var box = li.querySelector("input[type=checkbox]");
      box.addEventListener("change", function () {
        li.classList.toggle("checked", box.checked);
        focusCandidate(i);
      });
    });
    if (correction) {
      correction.addEventListener("keydown", function (event) {
        if (event.key === "Escape") {
          event.preventDefault();
          closeCorrection();
        }
      });
    }
    showFocus();

    document.addEventListener("keydown", function (event) {
      if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
      if (isTyping(event.target)) return;
      var key = event.key;
      var lower = key.length === 1 ? key.toLowerCase() : key;
      if (ratingPending) {
        ratingPending = false;
        if ("1234".indexOf(key) >= 0 && key.length === 1) {
          event.preventDefault();
          rateFocused(key);
          return;
        }
        say("");
        if (key === "Escape") return;
      }
      if (key.length === 1 && CANDIDATE_KEYS.indexOf(key) >= 0) {
        event.preventDefault();
        toggleCandidate(CANDIDATE_KEYS.indexOf(key));
        return;
      }
      var tag = event.target && event.target.tagName ? event.target.tagName.toLowerCase() : "";
      switch (lower) {
        case "ArrowDown":
        case "j":
          event.preventDefault();
          focusCandidate(Math.min(focused + 1, candidates.length - 1));
          break;
        case "ArrowUp":
        case "k":
          event.preventDefault();
          focusCandidate(Math.max(focused - 1, 0));
          break;
        case "r":
          event.preventDefault();
          if (focused >= 0) {
            ratingPending = true;
            say("Rate candidate " + (focused + 1) + ": press 1-4");
          }
          break;
        case "a":
          event.preventDefault();
          var wrong = byId("answer-wrong");
          wrong.checked = !wrong.checked;
          say(wrong.checked ? "The answer is marked wrong" : "The answer is marked right");
          break;
        case "c":
          event.preventDefault();
          openCorrection();
          break;
        case "n":
          event.preventDefault();
          submitWith(form, byId("none-fit-button"));
          break;
        case "s":
          event.preventDefault();
          submitWith(form, byId("skip-button"));
          break;
        case "Enter":
          if (tag === "button" || tag === "a" || tag === "summary") return; // their own Enter
          event.preventDefault();
          submitWith(form, byId("submit-button"));
          break;
        case "u":
          event.preventDefault();
          undo();
          break;
        default:
          break;
      }
    });
  }

  function undo() {
    var undoForm = byId("undo-form");
    if (undoForm && undoForm.dataset.submitted !== "1") {
      undoForm.dataset.submitted = "1";
      undoForm.submit();
    }
  }

  function setupUndoOnly() {
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || isTyping(event.target)) return;
      if (event.key === "u" || event.key === "U") {
        event.preventDefault();
        undo();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupNamespaceSelector();
    var form = byId("judge-form");
    if (form) setupJudging(form);
    else if (byId("undo-form")) setupUndoOnly();
  });
})();
