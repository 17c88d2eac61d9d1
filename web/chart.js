// A small loss chart on a <canvas>: steps on x, loss on y (axes, ticks, one line with dots).

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

/** Draws `points` ([{step, loss}]) on `canvas`; `totalSteps` fixes the x range. */
export function drawLossChart(canvas, points, totalSteps) {
  const dpr = globalThis.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || canvas.width;
  const cssH = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(cssW * dpr)) canvas.width = Math.round(cssW * dpr);
  if (canvas.height !== Math.round(cssH * dpr)) canvas.height = Math.round(cssH * dpr);
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const pad = { l: 52, r: 14, t: 12, b: 30 };
  const w = cssW - pad.l - pad.r;
  const h = cssH - pad.t - pad.b;
  const xmax = Math.max(totalSteps || 1, points.length ? points[points.length - 1].step : 1);
  let lo = Math.min(...points.map((p) => p.loss));
  let hi = Math.max(...points.map((p) => p.loss));
  if (!points.length) { lo = 0; hi = 1; }
  if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const margin = (hi - lo) * 0.08;
  lo = Math.max(0, lo - margin);
  hi += margin;
  const X = (s) => pad.l + (w * (s - 1)) / Math.max(1, xmax - 1);
  const Y = (v) => pad.t + h - (h * (v - lo)) / (hi - lo);

  g.font = '11px system-ui, sans-serif';
  g.strokeStyle = '#e3e7ee';
  g.fillStyle = '#5b6474';
  g.lineWidth = 1;
  const ys = niceStep(hi - lo, 5);
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  for (let v = Math.ceil(lo / ys) * ys; v <= hi + 1e-9; v += ys) {
    g.beginPath(); g.moveTo(pad.l, Y(v)); g.lineTo(pad.l + w, Y(v)); g.stroke();
    g.fillText(v.toFixed(ys < 0.1 ? 2 : ys < 1 ? 1 : 0), pad.l - 6, Y(v));
  }
  const xs = Math.max(1, Math.round(niceStep(xmax - 1, 8)));
  g.textAlign = 'center';
  g.textBaseline = 'top';
  for (let s = 1; s <= xmax; s += xs) g.fillText(String(s), X(s), pad.t + h + 6);
  g.strokeStyle = '#8a93a3';
  g.beginPath(); g.moveTo(pad.l, pad.t); g.lineTo(pad.l, pad.t + h); g.lineTo(pad.l + w, pad.t + h); g.stroke();
  g.save();
  g.translate(12, pad.t + h / 2); g.rotate(-Math.PI / 2); g.textAlign = 'center'; g.fillText('loss', 0, 0);
  g.restore();
  g.textAlign = 'right'; g.fillText('step', pad.l + w, pad.t + h + 18);

  if (!points.length) return;
  g.strokeStyle = '#2f6fdf';
  g.lineWidth = 2;
  g.beginPath();
  points.forEach((p, i) => (i ? g.lineTo(X(p.step), Y(p.loss)) : g.moveTo(X(p.step), Y(p.loss))));
  g.stroke();
  g.fillStyle = '#2f6fdf';
  for (const p of points) { g.beginPath(); g.arc(X(p.step), Y(p.loss), 2.5, 0, 2 * Math.PI); g.fill(); }
}
