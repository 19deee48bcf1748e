// The drawing page: strokes on #pad, the integer in #number, answers from POST /api/predict.
// A prediction is asked for when a stroke ends and when the number changes; an answer that
// comes back after a newer request (or after Clear) is dropped.
"use strict";

const PEN_WIDTH = 18;  // px on the 280x280 pad: about an MNIST stroke once scaled to 20x20

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const numberInput = document.getElementById("number");
const digitOut = document.getElementById("digit");
const sumOut = document.getElementById("sum");
const shownNumber = document.getElementById("shown-number");
const statusLine = document.getElementById("status");
const preview = document.getElementById("preview");
const digitBars = makeBars(document.getElementById("digit-bars"), 10);
const sumBars = makeBars(document.getElementById("sum-bars"), 19);

let drawing = false;
let hasInk = false;
let last = null;
let requestId = 0;  // the newest request; older answers are stale

function makeBars(chart, n) {
  const bars = [];
  for (let k = 0; k < n; k++) {
    const column = document.createElement("div");
    column.className = "bar";
    column.innerHTML = '<span class="p"></span><span class="track"><span class="fill"></span></span>' +
                       `<span class="k">${k}</span>`;
    chart.appendChild(column);
    bars.push(column);
  }
  return bars;
}

function showBars(bars, probs) {
  const top = probs ? probs.indexOf(Math.max(...probs)) : -1;
  bars.forEach((bar, k) => {
    const p = probs ? probs[k] : 0;
    bar.querySelector(".fill").style.height = `${(100 * p).toFixed(1)}%`;
    bar.querySelector(".p").textContent = probs && p >= 0.005 ? `${Math.round(100 * p)}` : "";
    bar.title = probs ? `${k}: ${(100 * p).toFixed(2)}%` : "";
    bar.classList.toggle("top", k === top);
  });
}

function showPreview(image) {
  const pctx = preview.getContext("2d");
  const data = pctx.createImageData(28, 28);
  for (let i = 0; i < 28 * 28; i++) {
    const v = image ? image[Math.floor(i / 28)][i % 28] : 0;
    data.data.set([v, v, v, 255], 4 * i);
  }
  pctx.putImageData(data, 0, 0);
}

function showAnswer(answer) {
  digitOut.textContent = answer ? String(answer.digit) : "";
  sumOut.textContent = answer ? String(answer.sum) : "";
  showBars(digitBars, answer ? answer.digit_probs : null);
  showBars(sumBars, answer ? answer.sum_probs : null);
  showPreview(answer ? answer.image : null);
}

function blankPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
}

async function predict() {
  shownNumber.textContent = numberInput.value;
  if (!hasInk) return;
  const id = ++requestId;
  statusLine.textContent = "reading…";
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({png: pad.toDataURL("image/png"), number: Number(numberInput.value),
                            return_image: true}),
    });
    const body = await response.json();
    if (id !== requestId) return;
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    showAnswer(body);
    statusLine.textContent = `digit ${body.digit} (${(100 * body.digit_probs[body.digit]).toFixed(1)}%), ` +
                             `sum ${body.sum} (${(100 * body.sum_probs[body.sum]).toFixed(1)}%)`;
  } catch (err) {
    if (id !== requestId) return;
    showAnswer(null);
    statusLine.textContent = `error: ${err.message}`;
  }
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width,
          (event.clientY - box.top) * pad.height / box.height];
}

function strokeTo(p) {
  ctx.beginPath();
  ctx.moveTo(last[0], last[1]);
  ctx.lineTo(p[0], p[1]);
  ctx.stroke();
  last = p;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  hasInk = true;
  last = point(event);
  strokeTo(last);  // a tap leaves a dot
});
pad.addEventListener("pointermove", (event) => {
  if (drawing) strokeTo(point(event));
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  predict();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

numberInput.addEventListener("change", predict);
document.getElementById("clear").addEventListener("click", () => {
  requestId++;  // drop any answer still on its way
  blankPad();
  showAnswer(null);
  statusLine.textContent = "Draw a digit in the box.";
});

ctx.lineCap = "round";
ctx.lineJoin = "round";
ctx.lineWidth = PEN_WIDTH;
ctx.strokeStyle = "#000";
blankPad();
showAnswer(null);
