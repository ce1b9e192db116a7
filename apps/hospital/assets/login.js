"use strict";
document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = document.getElementById("login-error");
  err.textContent = "";
  const body = {
    username: document.getElementById("username").value,
    password: document.getElementById("password").value,
  };
  try {
    const r = await fetch("/api/auth/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    if (r.ok) {
      location.href = "/app#/training";
      return;
    }
    const j = await r.json().catch(() => ({}));
    err.textContent = j.error || `Sign-in failed (${r.status})`;
  } catch (e) {
    err.textContent = "The server cannot be reached.";
  }
});
