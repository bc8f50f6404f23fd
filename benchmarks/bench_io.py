"""I/O micro-benchmark: adaptkit.io reader/writer vs the safetensors library on 192 MiB of bf16 (prints ratios)."""
import time, torch, tempfile, shutil, os
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
from adaptkit.io import SafetensorsFile, ShardedWriter, TensorSpec
import adaptkit.io.writer as W
d = Path(tempfile.mkdtemp(dir="/tmp"))
ts = {f"l{i}.w": torch.randn(1024, 1024).to(torch.bfloat16) for i in range(96)}  # 192 MiB
def best(f, n=3):
    r = []
    for _ in range(n):
        t = time.perf_counter(); f(); r.append(time.perf_counter() - t)
    return min(r)
def w_ref(): save_file(ts, d / "ref.safetensors")
def w_ours(sync=True):
    o = d / "ours"; shutil.rmtree(o, ignore_errors=True); o.mkdir()
    w = ShardedWriter(o, [TensorSpec.of(k, v) for k, v in ts.items()])
    for k, v in ts.items(): w.write(k, v)
    if not sync:
        W.os.fsync = lambda fd: None
    w.close()
    W.os.fsync = os.fsync
tr, to, tn = best(w_ref), best(w_ours), best(lambda: w_ours(False))
print(f"write: save_file {tr:.3f}s ours {to:.3f}s ({to/tr:.2f}x) ours-no-fsync {tn:.3f}s ({tn/tr:.2f}x)")
def r_ref():
    with safe_open(d / "ref.safetensors", "pt") as f:
        s = 0
        for k in f.keys(): s += f.get_tensor(k).view(torch.int16).sum()
def r_ours():
    with SafetensorsFile(d / "ref.safetensors") as f:
        s = 0
        for k in f.infos: s += f.get(k).view(torch.int16).sum()
r_ref(); a, c = best(r_ref), best(r_ours)
print(f"read+touch: safe_open {a:.3f}s ours {c:.3f}s ({c/a:.2f}x)")
shutil.rmtree(d)
