// e2e.mjs — drives a running `tuna serve` (BASE) with the official openai client and plain
// fetch: chat and completions, streaming and not, n>1, stop strings, seeds, logprobs, every
// error status, tokenize/detokenize, metrics, a client that disconnects, and a bounded load test
// of 64 concurrent streaming clients after which the KV cache must be empty again.
// Greedy outputs are compared with `tuna generate` (TUNA, MODEL) for the same request.
import { execFileSync } from 'node:child_process';
import OpenAI from 'openai';

const BASE = process.env.BASE, TUNA = process.env.TUNA, MODEL = process.env.MODEL;
const KEY = 'e2e-key';
const client = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120000 });
let failures = 0, checks = 0;
function check(cond, what, extra) {
  checks++;
  if (!cond) {
    failures++;
    console.log(`FAIL: ${what}`, extra === undefined ? '' : JSON.stringify(extra).slice(0, 600));
  }
}
function generate(args) {
  const out = execFileSync(TUNA, ['generate', MODEL, ...args], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
  return out.endsWith('\n') ? out.slice(0, -1) : out;
}
async function raw(path, body, { method = 'POST', auth = true, headers = {} } = {}) {
  const h = { 'Content-Type': 'application/json', ...headers };
  if (auth) h.Authorization = `Bearer ${KEY}`;
  const r = await fetch(`${BASE}${path}`, { method, headers: h, body });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, text, json };
}
async function expectStatus(promise, status, what) {
  try {
    await promise;
    check(false, `${what}: expected HTTP ${status}, got success`);
  } catch (e) {
    check(e.status === status, `${what}: expected HTTP ${status}`, { status: e.status, message: e.message });
    check(typeof e.error?.message === 'string' || typeof e.message === 'string', `${what}: has an error message`);
  }
}
async function metrics() {
  const r = await fetch(`${BASE}/metrics`);
  const t = await r.text();
  const val = (name) => {
    const m = t.match(new RegExp(`^vllm:${name}\\{[^}]*\\} ([0-9.e+-]+)$`, 'm'));
    return m ? Number(m[1]) : NaN;
  };
  return { text: t, val };
}
async function waitIdle(what) {
  for (let i = 0; i < 100; i++) {
    const m = await metrics();
    if (m.val('kv_cache_usage_perc') === 0 && m.val('num_requests_running') === 0 && m.val('num_requests_waiting') === 0) return m;
    await new Promise((r) => setTimeout(r, 100));
  }
  const m = await metrics();
  check(false, `${what}: KV cache usage back to 0 and no request running`, {
    kv: m.val('kv_cache_usage_perc'), running: m.val('num_requests_running'), waiting: m.val('num_requests_waiting') });
  return m;
}

const PROMPT = 'def fibonacci(n):';

// --- models, health ---
const models = await client.models.list();
check(models.data.length >= 1 && models.data[0].id === 'pymini', 'GET /v1/models lists pymini', models.data);
check((await fetch(`${BASE}/health`)).status === 200, 'GET /health is 200');

// --- completions, greedy, equal to tuna generate ---
const ref24 = generate(['--prompt', PROMPT, '--max-tokens', '24']);
const c1 = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 24, temperature: 0 });
check(c1.choices[0].text === ref24, 'completion text = tuna generate (greedy)', { got: c1.choices[0].text, want: ref24 });
check(c1.choices[0].finish_reason === 'length', 'completion finish_reason length', c1.choices[0]);
check(c1.usage.completion_tokens === 24 && c1.usage.prompt_tokens > 0 &&
      c1.usage.total_tokens === c1.usage.prompt_tokens + 24, 'completion usage', c1.usage);
check(c1.object === 'text_completion' && c1.id.startsWith('cmpl-'), 'completion object and id', c1);

// token ids as the prompt give the same continuation
const tk = await raw('/tokenize', JSON.stringify({ prompt: PROMPT }));
check(tk.status === 200 && tk.json.count === tk.json.tokens.length, 'POST /tokenize', tk.json);
const c1ids = await client.completions.create({ model: 'pymini', prompt: tk.json.tokens, max_tokens: 24 });
check(c1ids.choices[0].text === ref24, 'prompt as token ids = same text', c1ids.choices[0].text);
const dt = await raw('/detokenize', JSON.stringify({ tokens: tk.json.tokens }));
check(dt.status === 200 && dt.json.prompt.endsWith(PROMPT), 'POST /detokenize round trip', dt.json);

// --- streaming completion with usage ---
{
  const stream = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 24, stream: true,
                                                   stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null, chunks = 0;
  for await (const ch of stream) {
    chunks++;
    if (ch.choices.length) {
      text += ch.choices[0].text;
      if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
    }
    if (ch.usage) usage = ch.usage;
  }
  check(text === ref24, 'streamed completion = tuna generate', { got: text, want: ref24 });
  check(finish === 'length', 'streamed finish_reason', finish);
  check(usage && usage.completion_tokens === 24, 'stream usage chunk', usage);
  check(chunks > 3, 'streamed in several chunks', chunks);
}

// --- chat, streaming and not ---
const messages = [{ role: 'user', content: 'Write a function that adds two numbers.' }];
const chat = await client.chat.completions.create({ model: 'pymini', messages, max_completion_tokens: 20 });
check(chat.object === 'chat.completion' && chat.choices[0].message.role === 'assistant', 'chat response shape', chat);
check(chat.usage.completion_tokens <= 20 && ['stop', 'length'].includes(chat.choices[0].finish_reason), 'chat usage/finish', chat);
{
  const tkc = await raw('/tokenize', JSON.stringify({ messages }));
  const want = generate(['--ids', tkc.json.tokens.join(','), '--max-tokens', '20']);
  check(chat.choices[0].message.content === want, 'chat content = tuna generate on the templated ids',
        { got: chat.choices[0].message.content, want });
  const stream = await client.chat.completions.create({ model: 'pymini', messages, max_tokens: 20, stream: true });
  let text = '', role = null, finish = null;
  for await (const ch of stream) {
    const d = ch.choices[0]?.delta ?? {};
    if (d.role) role = d.role;
    text += d.content ?? '';
    if (ch.choices[0]?.finish_reason) finish = ch.choices[0].finish_reason;
  }
  check(role === 'assistant' && text === chat.choices[0].message.content && finish === chat.choices[0].finish_reason,
        'streamed chat = non-streamed chat', { role, text, finish });
}

// --- stop strings ---
{
  const cut = ref24.indexOf('(') > 0 ? '(' : ref24.slice(5, 7);
  const want = ref24.slice(0, ref24.indexOf(cut));
  const s = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 24, stop: [cut] });
  check(s.choices[0].text === want && s.choices[0].finish_reason === 'stop', 'stop string cuts the text',
        { got: s.choices[0].text, want, cut });
  const ss = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 24, stop: cut, stream: true });
  let t = '';
  for await (const ch of ss) t += ch.choices[0]?.text ?? '';
  check(t === want, 'stop string, streamed', { got: t, want });
  const viaGen = generate(['--prompt', PROMPT, '--max-tokens', '24', '--stop', cut]);
  check(viaGen === want, 'stop string = tuna generate --stop', { viaGen, want });
}

// --- n > 1 and seeds ---
{
  const req = { model: 'pymini', prompt: PROMPT, max_tokens: 16, n: 3, temperature: 1.0, seed: 1234 };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  check(a.choices.length === 3 && new Set(a.choices.map((c) => c.index)).size === 3, 'n=3 gives three choices', a.choices);
  check(JSON.stringify(a.choices.map((c) => c.text)) === JSON.stringify(b.choices.map((c) => c.text)),
        'same seed, same texts', { a: a.choices.map((c) => c.text), b: b.choices.map((c) => c.text) });
  check(a.usage.completion_tokens === a.choices.length * 16 || a.choices.some((c) => c.finish_reason === 'stop'),
        'n=3 usage counts every choice', a.usage);
  const c = await client.completions.create({ ...req, seed: 99 });
  check(JSON.stringify(a.choices.map((x) => x.text)) !== JSON.stringify(c.choices.map((x) => x.text)),
        'another seed, other texts');
  const g = await client.chat.completions.create({ model: 'pymini', messages, max_tokens: 8, n: 2, temperature: 0 });
  check(g.choices.length === 2 && g.choices[0].message.content === g.choices[1].message.content, 'greedy n=2 identical');
}

// --- logprobs, min_tokens, ignore_eos, extra vLLM params ---
{
  const l = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 5, logprobs: 2 });
  const lp = l.choices[0].logprobs;
  check(lp && lp.tokens.length === 5 && lp.token_logprobs.every((x) => x <= 0) && lp.top_logprobs[0] &&
        Object.keys(lp.top_logprobs[0]).length >= 1, 'completion logprobs', lp);
  check(lp.tokens.join('') === l.choices[0].text, 'logprob tokens spell the text', lp.tokens);
  const cl = await client.chat.completions.create({ model: 'pymini', messages, max_tokens: 4, logprobs: true, top_logprobs: 3 });
  const cc = cl.choices[0].logprobs?.content;
  check(cc && cc.length === cl.usage.completion_tokens && cc[0].top_logprobs.length === 3 &&
        cc[0].top_logprobs[0].logprob >= cc[0].top_logprobs[2].logprob, 'chat logprobs', cc);
  const e = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 30, min_tokens: 30,
                                              ignore_eos: true, top_k: 5, top_p: 0.9, min_p: 0.05,
                                              repetition_penalty: 1.1, temperature: 0.8, seed: 3 });
  check(e.usage.completion_tokens === 30 && e.choices[0].finish_reason === 'length', 'min_tokens/ignore_eos', e.usage);
}

// --- errors ---
await expectStatus(client.completions.create({ model: 'nope', prompt: 'x', max_tokens: 2 }), 404, 'unknown model');
await expectStatus(client.completions.create({ model: 'pymini', prompt: 'x', max_tokens: 'many' }), 400, 'wrong type');
await expectStatus(client.completions.create({ model: 'pymini', prompt: 'x', max_tokens: 5000 }), 400,
                   'prompt + max_tokens beyond max-model-len');
await expectStatus(client.chat.completions.create({ model: 'pymini', messages: 'hi' }), 400, 'messages not a list');
await expectStatus(client.completions.create({ model: 'pymini', prompt: 'x', temperature: -2 }), 400, 'temperature < 0');
await expectStatus(new OpenAI({ baseURL: `${BASE}/v1`, apiKey: 'wrong', maxRetries: 0 }).models.list(), 401, 'wrong API key');
{
  const bad = await raw('/v1/completions', '{"prompt": "x", ');
  check(bad.status === 400 && bad.json?.error?.message.includes('not valid JSON'), 'malformed JSON is 400', bad);
  const big = await raw('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(100000) }));
  check(big.status === 413 && big.json?.error?.code === 413, 'body over the limit is 413', big.status);
  const noauth = await raw('/v1/models', undefined, { method: 'GET', auth: false });
  check(noauth.status === 401 && noauth.json?.error, 'no API key is 401', noauth.status);
  const route = await raw('/v1/nothing', '{}');
  check(route.status === 404 && route.json?.error, 'unknown route is 404', route.status);
  const meth = await raw('/v1/completions', undefined, { method: 'GET' });
  check(meth.status === 405, 'wrong method is 405', meth.status);
}

// --- a client that disconnects mid-stream cancels its request ---
{
  const m0 = await metrics();
  const ac = new AbortController();
  const stream = await client.completions.create({ model: 'pymini', prompt: PROMPT, max_tokens: 900, ignore_eos: true,
                                                   stream: true }, { signal: ac.signal });
  let n = 0;
  try {
    for await (const ch of stream) { if (++n === 3) ac.abort(); }
  } catch { /* aborted */ }
  const m = await waitIdle('after a disconnect');
  const aborted = (m.text.match(/finished_reason="abort"[^}]*\} (\d+)/) || [])[1];
  const aborted0 = (m0.text.match(/finished_reason="abort"[^}]*\} (\d+)/) || [])[1];
  check(Number(aborted) === Number(aborted0) + 1, 'the disconnected request was aborted', { aborted0, aborted });
  const gen = m.val('generation_tokens_total'), gen0 = m0.val('generation_tokens_total');
  check(gen - gen0 < 900, 'it stopped generating', { gen0, gen });
}

// --- bounded load test: 64 concurrent streaming clients, 192 requests ---
{
  const prompts = ['import os\n', 'class Foo:', 'def main():', 'for i in range(', '# utils\n', 'x = [', 'return ', 'if x:'];
  let next = 0, done = 0, bad = 0;
  const N = 192;
  async function worker() {
    while (next < N) {
      const i = next++;
      const chat = i % 3 === 0;
      const stream = chat
        ? await client.chat.completions.create({ model: 'pymini', messages: [{ role: 'user', content: prompts[i % 8] }],
                                                  max_tokens: 24, stream: true, stream_options: { include_usage: true } })
        : await client.completions.create({ model: 'pymini', prompt: prompts[i % 8], max_tokens: 24, stream: true,
                                             stream_options: { include_usage: true }, temperature: i % 2 ? 0.9 : 0, seed: i });
      let finish = null, usage = null;
      for await (const ch of stream) {
        if (ch.choices?.[0]?.finish_reason) finish = ch.choices[0].finish_reason;
        if (ch.usage) usage = ch.usage;
      }
      if ((finish === 'stop' || finish === 'length') && usage && usage.completion_tokens <= 24) done++;
      else bad++;
    }
  }
  const t0 = Date.now();
  await Promise.all(Array.from({ length: 64 }, worker));
  check(done === N && bad === 0, `load test: all ${N} requests complete`, { done, bad });
  const m = await waitIdle('after the load test');
  console.log(`load test: ${N} requests, 64 clients, ${((Date.now() - t0) / 1000).toFixed(1)} s; preemptions ${m.val('num_preemptions_total')}`);
  check(m.text.includes('vllm:time_to_first_token_seconds_bucket') && m.text.includes('vllm:inter_token_latency_seconds_sum'),
        'TTFT and ITL histograms present');
}
check((await fetch(`${BASE}/health`)).status === 200, 'server alive after everything');

console.log(`${checks - failures}/${checks} checks passed`);
process.exit(failures ? 1 : 0);
