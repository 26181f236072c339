"""The playground served at ``GET /``: one self-contained HTML page (no external assets) that lists the
adapters from ``/v1/adapters`` and calls ``/v1/predict`` or ``/v1/generate``, drawing probabilities as
bars and tags under their words; ``?adapter=NAME&text=...`` runs at once.
"""

PLAYGROUND = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ptune playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } select, textarea, input, button { font: inherit; }
 textarea { width: 100%; box-sizing: border-box; }
 #about { color: #666; font-size: .9em; } #status { color: #b00; min-height: 1.4em; }
 .row { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
 .row .name { width: 10rem; text-align: right; overflow: hidden; text-overflow: ellipsis; }
 .track { flex: 1; background: #eee; height: 1.1rem; border-radius: 3px; }
 .bar { background: #3b7dd8; height: 100%; border-radius: 3px; } .top .bar { background: #1c5fb8; }
 .value { width: 4rem; font-variant-numeric: tabular-nums; }
 .tok { display: inline-block; margin: .15rem; padding: .1rem .3rem; border-radius: 3px; background: #f3f3f3; }
 .tok small { display: block; color: #1c5fb8; font-size: .75em; }
 #generated { white-space: pre-wrap; background: #f7f7f7; padding: .6rem; border-radius: 4px; }
</style></head>
<body>
<h1>ptune playground</h1>
<p><label>Adapter <select id="adapter"></select></label> <span id="about"></span></p>
<p><textarea id="text" rows="4" placeholder="Type some text">The striker scored twice in the cup final</textarea></p>
<p id="genopts" hidden>max new tokens <input id="max_new_tokens" type="number" value="32" min="1" style="width:5em">
 temperature <input id="temperature" type="number" value="0" step="0.1" min="0" style="width:5em">
 top p <input id="top_p" type="number" value="1" step="0.05" min="0" max="1" style="width:5em"></p>
<p><button id="go">Run</button> <span id="timing"></span></p>
<div id="status"></div>
<div id="out"></div>
<p style="margin-top:2rem;color:#666;font-size:.9em"><a href="/docs">API docs</a> · <a href="/metrics">metrics</a>
 · <a href="/v1/adapters">adapters</a></p>
<script>
const $ = (id) => document.getElementById(id);
const adapters = {};
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function describe() {
  const a = adapters[$('adapter').value]; if (!a) return;
  $('about').textContent = `${a.method}, ${a.head} head, task ${a.task}, ${a.trainable_params} trainable parameters`;
  $('genopts').hidden = a.endpoint !== 'generate';
}
async function loadAdapters() {
  const r = await fetch('/v1/adapters'); const body = await r.json();
  const sel = $('adapter'); sel.textContent = '';
  for (const a of body.adapters) {
    adapters[a.name] = a; const o = el('option', '', `${a.name} (${a.endpoint})`); o.value = a.name; sel.appendChild(o);
  }
  if (!body.adapters.length) $('status').textContent = 'no adapter is loaded';
  describe();
}
function showBars(result) {
  const out = $('out'); out.textContent = '';
  const probs = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of probs) {
    const row = el('div', 'row' + (label === result.label ? ' top' : ''));
    row.dataset.label = label;
    row.appendChild(el('span', 'name', label));
    const track = el('div', 'track'); const bar = el('div', 'bar'); bar.style.width = (100 * p).toFixed(1) + '%';
    track.appendChild(bar); row.appendChild(track); row.appendChild(el('span', 'value', p.toFixed(3)));
    out.appendChild(row);
  }
}
function showTags(result) {
  const out = $('out'); out.textContent = '';
  result.tokens.forEach((t, i) => { const s = el('span', 'tok', t); s.appendChild(el('small', '', result.tags[i]));
    out.appendChild(s); });
}
async function run() {
  const a = adapters[$('adapter').value]; if (!a) return;
  $('status').textContent = ''; const started = performance.now();
  const gen = a.endpoint === 'generate';
  const body = gen ? {adapter: a.name, inputs: [$('text').value], max_new_tokens: +$('max_new_tokens').value,
                      temperature: +$('temperature').value, top_p: +$('top_p').value}
                   : {adapter: a.name, inputs: [$('text').value]};
  try {
    const r = await fetch(gen ? '/v1/generate' : '/v1/predict', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const res = await r.json();
    $('timing').textContent = `${Math.round(performance.now() - started)} ms`;
    if (!r.ok) { $('out').textContent = ''; $('status').textContent = `error ${r.status}: ${res.error}`; return; }
    const result = res.results[0];
    if (gen) { $('out').textContent = ''; $('out').appendChild(el('div', '', '')).id = 'generated';
               $('generated').textContent = result.text; }
    else if (result.tags) showTags(result); else showBars(result);
    document.body.dataset.done = '1';
  } catch (e) { $('status').textContent = String(e); }
}
$('adapter').addEventListener('change', describe);
$('go').addEventListener('click', run);
$('text').addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) run(); });
loadAdapters().then(() => {  // ?adapter=NAME&text=... runs at once (links, tests)
  const q = new URLSearchParams(location.search);
  if (q.get('adapter')) $('adapter').value = q.get('adapter');
  if (q.get('text')) { $('text').value = q.get('text'); describe(); run(); }
}).catch((e) => { $('status').textContent = 'could not list the adapters: ' + e; });
</script>
</body></html>
"""
