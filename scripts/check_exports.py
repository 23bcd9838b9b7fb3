#!/usr/bin/env python3
"""check_exports.py — do transformers / PEFT / bitsandbytes load what `tuna export` writes, and
do they compute the same logits as tuna?

Run on a machine with torch, transformers, peft (and bitsandbytes + CUDA for the 4-bit checks):

    python3 scripts/check_exports.py --tuna build/tuna \
        --model ../shared/fixtures/models/llama-tiny \
        --adapter ../shared/fixtures/lora/llama-tiny/adapter \
        [--model-4bit ../shared/fixtures/bnb/llama-tiny-bnb-nf4-dq] [--work /tmp/tuna-exports]

What it does (each line of the final table is one check, PASS or FAIL; exit status 1 on any FAIL):
  1. `tuna export adapter`, `merged-16bit`, `merged-4bit` (and merged-16bit from the 4-bit base
     when --model-4bit is given) into --work.
  2. adapter: PeftModel.from_pretrained(base, export) must give the same logits as PEFT with the
     original adapter (the export is the same adapter), and its config must load as LoraConfig.
     When `tuna logits` has --lora, tuna's unmerged logits are compared with PEFT's too.
  3. merged-16bit: transformers loads the folder (no quantization_config may be left) and its
     float32 logits must match `tuna logits` on the same folder; its tensors are compared with
     PEFT's merge_and_unload() in the stored dtype (count of elements more than 1 ulp apart).
  4. merged-4bit: transformers + bitsandbytes load it as a pre-quantized checkpoint (CUDA only);
     its logits must be close to the 16-bit merge (quantization error only) and, where tuna can
     run 4-bit folders, to `tuna logits` on it.
tuna's logits come from `tuna logits DIR --ids ... -o FILE.safetensors` (tensor "logits" [T, V]).
Float32 compute, eager attention, TF32 off, as the fixtures' references were made.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as torch_load_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

RESULTS = []  # (check, value, limit, ok)


def record(check, value, limit, ok=None):
    if ok is None:
        ok = value <= limit
    RESULTS.append((check, value, limit, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {check}: {value:.3e} (limit {limit:.1e})", flush=True)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den else float(np.linalg.norm(a - b))


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.stdout.strip():
        print(p.stdout.strip())
    if p.stderr.strip():
        print(p.stderr.strip())
    return p.returncode


def tuna_logits(tuna, folder, ids, work, tag, lora=None):
    """Logits [T, V] from `tuna logits`, or None when tuna cannot run this folder."""
    out = os.path.join(work, f"logits-{tag}.safetensors")
    # tuna's float32 reference path: the CPU backend (a GPU build would otherwise pick CUDA/bf16)
    cmd = [tuna, "logits", folder, "--ids", ",".join(str(i) for i in ids), "-o", out, "--device", "cpu"]
    if lora:
        cmd += ["--lora", lora]
    if run(cmd) != 0:
        return None
    return np_load_file(out)["logits"]


def tuna_has_flag(tuna, cmd, flag):
    p = subprocess.run([tuna, cmd, "--help"], capture_output=True, text=True)
    return flag in (p.stdout + p.stderr)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_model(folder, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **kw)
    if "device_map" not in kw:
        m = m.to(device())
    return m.eval()


@torch.no_grad()
def hf_logits(model, ids):
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    return model(input_ids=x).logits[0].float().cpu().numpy()


def prompts_for(model_dir, vocab):
    """A few prompts as ids: the fixture's reference prompts when present, else tokenized text."""
    ref = os.path.join(model_dir, "reference.safetensors")
    if os.path.exists(ref):
        r = np_load_file(ref)
        out = []
        i = 0
        while f"prompt{i}.input_ids" in r:
            out.append([int(t) for t in r[f"prompt{i}.input_ids"]])
            i += 1
        if out:
            return out
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
        return [tok(t)["input_ids"] for t in texts]
    except Exception as e:  # noqa: BLE001 - any tokenizer problem: fall back to fixed ids
        print(f"(no tokenizer: {e}; using fixed ids)")
        return [[(7 * i + 3) % vocab for i in range(12)], [(13 * i + 1) % vocab for i in range(20)]]


def check_adapter(a, tuna, base, adapter, exported, prompts, work):
    from peft import LoraConfig, PeftModel

    cfg = json.load(open(os.path.join(exported, "adapter_config.json")))
    LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})
    base_model = hf_model(base)
    ref = PeftModel.from_pretrained(hf_model(base), adapter).eval()
    got = PeftModel.from_pretrained(base_model, exported).eval()
    has_lora = tuna_has_flag(tuna, "logits", "--lora")
    for i, ids in enumerate(prompts):
        lr, lg = hf_logits(ref, ids), hf_logits(got, ids)
        record(f"adapter prompt{i}: PEFT(export) vs PEFT(original)", rel_err(lg, lr), 1e-6)
        if has_lora:
            lt = tuna_logits(tuna, base, ids, work, f"adapter-{i}", lora=exported)
            if lt is None:
                record(f"adapter prompt{i}: tuna logits --lora ran", 1.0, 0.0, ok=False)
            else:
                record(f"adapter prompt{i}: tuna --lora vs PEFT", rel_err(lt, lr), a.tol)
    if not has_lora:
        print("(tuna logits has no --lora yet: unmerged tuna-vs-PEFT comparison skipped)")


def count_ulp_diffs(a, b):
    """Elements of two same-dtype tensors more than 1 ulp apart (16-bit: compare bit patterns)."""
    if a.dtype in (torch.bfloat16, torch.float16):
        x = a.contiguous().view(torch.int16).to(torch.int32)
        y = b.contiguous().view(torch.int16).to(torch.int32)
        d = (x - y).abs()
        return int((d > 1).sum()), int((d == 1).sum())
    return int((a != b).sum()), 0


def check_merged16(a, tuna, base, adapter, exported, prompts, work, tag):
    cfg_text = open(os.path.join(exported, "config.json")).read()
    record(f"{tag}: config.json has no quantization_config", float("quantization_config" in cfg_text), 0.0)
    model = hf_model(exported)
    for i, ids in enumerate(prompts):
        lh = hf_logits(model, ids)
        lt = tuna_logits(tuna, exported, ids, work, f"{tag}-{i}")
        if lt is None:
            record(f"{tag} prompt{i}: tuna logits ran", 1.0, 0.0, ok=False)
            continue
        record(f"{tag} prompt{i}: tuna vs transformers on the export", rel_err(lt, lh), a.tol)
    del model
    if base is None:
        return
    # PEFT's own merge in the stored dtype, tensor by tensor
    from peft import PeftModel

    base_cfg = json.load(open(os.path.join(base, "config.json")))
    stored = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "bfloat16"
    merged = PeftModel.from_pretrained(hf_model(base, dtype=getattr(torch, stored)), adapter).merge_and_unload()
    sd = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    ours = {}
    for f in os.listdir(exported):
        if f.endswith(".safetensors"):
            ours.update(torch_load_file(os.path.join(exported, f)))
    far = one = total = 0
    missing = [k for k in ours if k not in sd]
    for k, v in ours.items():
        if k in sd and sd[k].shape == v.shape:
            f_, o_ = count_ulp_diffs(v, sd[k].to(v.dtype))
            far += f_
            one += o_
            total += v.numel()
    print(f"{tag}: vs PEFT merge_and_unload: {total - far - one} equal, {one} within 1 ulp, {far} beyond, "
          f"{len(missing)} tensors not in PEFT's state dict")
    record(f"{tag}: elements > 1 ulp from PEFT's merge", float(far), 0.0)


def check_merged4(a, tuna, exported, merged16, prompts, work):
    if not torch.cuda.is_available():
        print("(no CUDA: merged-4bit load through bitsandbytes skipped)")
        return
    cfg = json.load(open(os.path.join(exported, "config.json")))
    record("merged-4bit: config.json has quantization_config", float("quantization_config" not in cfg), 0.0)
    m4 = hf_model(exported, dtype=torch.float32, device_map={"": 0})
    m16 = hf_model(merged16)
    for i, ids in enumerate(prompts):
        l4, l16 = hf_logits(m4, ids), hf_logits(m16, ids)
        # NF4 quantization error only: loose, but well below the distance between the base and the
        # adapted model on the fixtures (rel err 0.5-0.8) or between unrelated models (~1.4)
        record(f"merged-4bit prompt{i}: transformers+bnb vs the 16-bit merge", rel_err(l4, l16), 0.3)
        lt = tuna_logits(tuna, exported, ids, work, f"m4-{i}")
        if lt is None:
            print(f"(tuna logits cannot run the 4-bit folder yet: prompt{i} tuna comparison skipped)")
        else:
            record(f"merged-4bit prompt{i}: tuna vs transformers+bnb", rel_err(lt, l4), 1e-3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuna", default="build/tuna")
    ap.add_argument("--model", required=True, help="16-bit base model folder")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder trained on --model")
    ap.add_argument("--model-4bit", help="bitsandbytes 4-bit checkpoint of the same base (optional)")
    ap.add_argument("--work", help="output folder (default: a temporary one, removed at the end)")
    ap.add_argument("--tol", type=float, default=1e-4, help="rel. error limit tuna vs transformers (float32)")
    a = ap.parse_args()

    work = a.work or tempfile.mkdtemp(prefix="tuna-exports-")
    os.makedirs(work, exist_ok=True)
    exp = {k: os.path.join(work, k) for k in ("adapter", "merged16", "merged4", "merged16-from4")}
    for p in exp.values():
        shutil.rmtree(p, ignore_errors=True)
    ok = run([a.tuna, "export", "adapter", "--adapter", a.adapter, exp["adapter"]]) == 0
    ok &= run([a.tuna, "export", "merged-16bit", "--model", a.model, "--adapter", a.adapter, exp["merged16"]]) == 0
    ok &= run([a.tuna, "export", "merged-4bit", "--model", a.model, "--adapter", a.adapter, exp["merged4"]]) == 0
    if a.model_4bit:
        ok &= run([a.tuna, "export", "merged-16bit", "--model", a.model_4bit, "--adapter", a.adapter,
                   exp["merged16-from4"]]) == 0
    record("tuna export commands succeeded", 0.0 if ok else 1.0, 0.0)
    if not ok:
        sys.exit(1)

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    prompts = prompts_for(a.model, vocab)
    check_adapter(a, a.tuna, a.model, a.adapter, exp["adapter"], prompts, work)
    check_merged16(a, a.tuna, a.model, a.adapter, exp["merged16"], prompts, work, "merged-16bit")
    check_merged4(a, a.tuna, exp["merged4"], exp["merged16"], prompts, work)
    if a.model_4bit:
        # merged into dequantized 4-bit weights: no PEFT counterpart in 16 bits; tuna vs transformers only
        check_merged16(a, a.tuna, None, a.adapter, exp["merged16-from4"], prompts, work, "merged-16bit-from-4bit")

    bad = [r for r in RESULTS if not r[3]]
    print(f"\n{len(RESULTS) - len(bad)} of {len(RESULTS)} checks passed")
    for r in bad:
        print(f"FAILED: {r[0]}: {r[1]:.3e} (limit {r[2]:.1e})")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
