// Plinth console: follows a job's log and the event stream over server-sent events.
// No framework, no build step; the pages work without it (the log so far is in the page).
"use strict";

function followLog(pre) {
  const status = document.getElementById("logs-status");
  const source = new EventSource(pre.dataset.follow);
  source.onmessage = (message) => {
    const item = JSON.parse(message.data);
    if (item.text) {
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(document.createTextNode(item.text));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    if (item.error) status.textContent = "The log stopped: " + item.error;
    if (item.end) {
      status.textContent = "The job has ended.";
      source.close();
    }
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) status.textContent = "The log stream closed.";
  };
}

function followEvents(body) {
  const status = document.getElementById("events-status");
  const source = new EventSource(body.dataset.stream);
  source.onopen = () => { status.textContent = "Live."; };
  source.onmessage = (message) => {
    const item = JSON.parse(message.data);
    if (item.error) { status.textContent = "The stream stopped: " + item.error; return; }
    const row = document.createElement("tr");
    for (const key of ["time", "type", "team", "subject", "data"]) {
      const cell = document.createElement(key === "type" ? "th" : "td");
      if (key === "type") cell.scope = "row";
      if (key === "data") {
        const code = document.createElement("code");
        code.textContent = item[key];
        cell.append(code);
      } else {
        cell.textContent = item[key];
      }
      row.append(cell);
    }
    body.prepend(row);
    while (body.rows.length > 500) body.deleteRow(-1);
  };
  source.onerror = () => { status.textContent = "Reconnecting…"; };
}

document.addEventListener("DOMContentLoaded", () => {
  const pre = document.querySelector("pre[data-follow]");
  if (pre) followLog(pre);
  const events = document.querySelector("tbody[data-stream]");
  if (events) followEvents(events);
});
