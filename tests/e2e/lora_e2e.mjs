// lora_e2e.mjs — runtime LoRA adapters and chat templates against a running `tuna serve`
// (started by lora_e2e.sh). Plain fetch; every check throws on failure.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import assert from 'node:assert/strict';

const { BASE, TUNA, MODEL, TPLMODEL, WORK } = process.env;
let passed = 0;
const ok = (what) => { passed++; console.log(`ok ${passed} - ${what}`); };

async function post(path, body) {
  const r = await fetch(BASE + path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* plain text */ }
  return { status: r.status, text, json };
}
const models = async () => (await (await fetch(BASE + '/v1/models')).json()).data.map((m) => [m.id, m.parent, m.root]);

// 1. nothing loaded yet; paths outside the root are refused
assert.deepEqual((await models()).map((m) => m[0]), ['llama-tiny']);
ok('/v1/models lists only the base model at start');
for (const p of ['../outside/tiny', 'escape', WORK + '/outside/tiny', '.', '/etc']) {
  const r = await post('/v1/load_lora_adapter', { lora_name: 'x', lora_path: p });
  assert.equal(r.status, 400, `${p}: ${r.text}`);
  assert.match(r.json.error.message, /not inside --lora-root/);
}
ok('paths leaving --lora-root (.., symlink, absolute, the root itself) are refused with 400');
let r = await post('/v1/load_lora_adapter', { lora_name: 'x', lora_path: 'missing' });
assert.equal(r.status, 404, r.text);
r = await post('/v1/load_lora_adapter', { lora_name: 'x' });
assert.equal(r.status, 400, r.text);
assert.equal(r.json.error.param, 'lora_path');
r = await post('/v1/unload_lora_adapter', { lora_name: 'tiny' });
assert.equal(r.status, 404, r.text);
ok('missing folder 404, missing lora_path 400, unloading an unknown adapter 404');

// 2. load at run time, generate with it by name: greedy equals `tuna generate --lora`
r = await post('/v1/load_lora_adapter', { lora_name: 'tiny', lora_path: 'tiny' });
assert.equal(r.status, 200, r.text);
assert.match(r.text, /Success: LoRA adapter 'tiny' added/);
assert.deepEqual((await models()).map((m) => m.slice(0, 2)), [['llama-tiny', null], ['tiny', 'llama-tiny']]);
assert.match((await models())[1][2], /root\/tiny$/);
ok('load_lora_adapter answers Success and /v1/models lists the adapter with parent');
r = await post('/v1/load_lora_adapter', { lora_name: 'tiny2', lora_path: 'tiny' });
assert.equal(r.status, 400, r.text);
assert.match(r.json.error.message, /all 1 adapter slots/);
r = await post('/v1/load_lora_adapter', { lora_name: 'tiny', lora_path: 'tiny' });
assert.equal(r.status, 400, r.text);
assert.match(r.json.error.message, /already been loaded/);
ok('--max-loras 1: a second adapter is refused (400), as is a duplicate name');

const prompt = 'Once upon a time';
const want = execFileSync(TUNA, ['generate', MODEL, '--lora', WORK + '/root/tiny', '--prompt', prompt,
  '--max-tokens', '16', '--temperature', '0', '--threads', '2'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
const base = execFileSync(TUNA, ['generate', MODEL, '--prompt', prompt, '--max-tokens', '16', '--temperature', '0',
  '--threads', '2'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
assert.notEqual(want, base, 'the adapter should change the greedy output');
r = await post('/v1/completions', { model: 'tiny', prompt, max_tokens: 16, temperature: 0 });
assert.equal(r.status, 200, r.text);
assert.equal(r.json.model, 'tiny');
assert.equal(r.json.choices[0].text, want.replace(/\n$/, ''));
r = await post('/v1/completions', { model: 'llama-tiny', prompt, max_tokens: 16, temperature: 0 });
assert.equal(r.json.choices[0].text, base.replace(/\n$/, ''));
ok('greedy completion with the runtime adapter equals `tuna generate --lora`; the base model is unchanged');

// 3. an unload waits for the request that uses the adapter, then the name is 404
const long = post('/v1/completions', { model: 'tiny', prompt, max_tokens: 400, temperature: 0, ignore_eos: true });
await new Promise((res) => setTimeout(res, 30));
const order = [];
const [lr, ur] = await Promise.all([long.then((x) => { order.push('generate'); return x; }),
  post('/v1/unload_lora_adapter', { lora_name: 'tiny' }).then((x) => { order.push('unload'); return x; })]);
assert.equal(lr.status, 200, lr.text);
assert.equal(lr.json.usage.completion_tokens, 400);
assert.equal(ur.status, 200, ur.text);
assert.match(ur.text, /Success: LoRA adapter 'tiny' removed/);
assert.deepEqual(order, ['generate', 'unload']);
ok('unload_lora_adapter waits for the running request that uses the adapter');
r = await post('/v1/completions', { model: 'tiny', prompt, max_tokens: 4 });
assert.equal(r.status, 404, r.text);
assert.deepEqual((await models()).map((m) => m[0]), ['llama-tiny']);
ok('after the unload the adapter is 404 and gone from /v1/models');
r = await post('/v1/load_lora_adapter', { lora_name: 'again', lora_path: WORK + '/root/tiny' });
assert.equal(r.status, 200, r.text);
r = await post('/v1/completions', { model: 'again', prompt, max_tokens: 16, temperature: 0 });
assert.equal(r.json.choices[0].text, want.replace(/\n$/, ''));
ok('the freed slot takes another load (absolute path inside the root) with the same greedy output');

// 4. chat: tools reach the template (None when absent); 1.0 stays a float
const messages = [{ role: 'user', content: 'What is the weather?' }];
const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { x: { type: 'number', default: 1.0 } } } } }];
writeFileSync(WORK + '/messages.json', JSON.stringify(messages));
writeFileSync(WORK + '/tools.json', '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"x": {"type": "number", "default": 1.0}}}}}]');
const tplIds = (extra) => JSON.parse(execFileSync(TUNA, ['template', TPLMODEL, '--messages', WORK + '/messages.json',
  '--add-generation-prompt', '--tokenize', ...extra], { encoding: 'utf8' }));
const body = '{"messages": ' + JSON.stringify(messages) + ', "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"x": {"type": "number", "default": 1.0}}}}}]}';
const tk = await (await fetch(BASE + '/tokenize', { method: 'POST', body })).json();
assert.deepEqual(tk.tokens, tplIds(['--tools', WORK + '/tools.json']));
const text = (await post('/detokenize', { tokens: tk.tokens })).json.prompt;
assert.match(text, /TOOLS \[\{"type": "function"/);
assert.match(text, /"default": 1\.0/);
const tk0 = (await post('/tokenize', { messages })).json;
assert.deepEqual(tk0.tokens, tplIds([]));
assert.match((await post('/detokenize', { tokens: tk0.tokens })).json.prompt, /NO TOOLS/);
ok('/tokenize with tools renders them through the template (1.0 kept), without tools they are None');
r = await fetch(BASE + '/v1/chat/completions', { method: 'POST', body: body.replace(/^\{/, '{"max_tokens": 4, "temperature": 0, ') });
const chat = await r.json();
assert.equal(r.status, 200, JSON.stringify(chat));
assert.equal(chat.usage.prompt_tokens, tk.count);
ok('a chat completion with tools uses the tools prompt');
r = await post('/v1/chat/completions', { messages, tools: { not: 'a list' } });
assert.equal(r.status, 400, r.text);
assert.equal(r.json.error.param, 'tools');
ok('tools that are not a list are refused with 400');
console.log(`${passed} checks passed`);
