"""The AutoAWQ peer: quantize a local HF folder with AutoAWQ on CPU, using given calibration token ids.

Runs inside the peer venv (``.venv-interop``: autoawq 0.2.9, transformers 5.x, torch CPU)::

    .venv-interop/bin/python benchmarks/peer_autoawq.py MODEL_DIR OUT_DIR IDS_JSON \\
        --w-bit 4 --group-size 64 [--threads N]

* IDS_JSON: a JSON list of equally long lists of token ids (the calibration windows, e.g. 16 x 256);
* AutoAWQ gets them as ``calib_data`` (a list of token-id lists) with ``max_calib_samples = len(ids)`` and
  ``max_calib_seq_len = len(ids[0])``: its ``get_calib_dataset`` then keeps every window as it is (no
  tokenizer call, none dropped), concatenates them and cuts the result back into the same windows; the script
  checks that before timing;
* quant_config ``{"zero_point": True, "q_group_size": gs, "w_bit": bits, "version": "GEMM"}``; AutoAWQ's own
  algorithm (per-block activation-aware scale search, then clip search, then GEMM packing);
* writes ``OUT_DIR`` with ``save_quantized`` (safetensors) and prints, last,
  ``PEER_RESULT {"seconds": quantize+save, "import_s": ..., "version": ...}``.

AutoAWQ 0.2.9 targets transformers 4.4x and a GPU. With transformers 5.24 / torch 2.13 CPU its forward path runs
as is: ``get_best_device()`` falls back to "cpu", the decoder layers return a tensor (AutoAWQ accepts tensor or
tuple), and the kwargs it catches at layer 0 (``position_ids``, ``position_embeddings``, ``use_cache``; no mask)
are what transformers 5 layers take. Checked by hand on SmolLM2-135M (16 x 256): chaining AutoAWQ's own per-block
forward (``_module_forward`` with ``_sanitize_kwargs``) over all 30 layers reproduces the model's hidden states
exactly (max |diff| 0.0), repeated attention calls give identical outputs (no KV cache growing between the
grid-search forwards), and the attention is causal. What does break is CPU-only, silently: the scale search's
weight snapshot aliases the live weights (see ``_patch_autoawq``, the one shim, which gives it the copy a GPU run
gets). Otherwise AutoAWQ's defaults are kept, plus two explicit choices: ``attn_implementation="sdpa"`` (AutoAWQ
passes ``attention_mask=None`` to the blocks; sdpa then applies the causal mask itself, eager would not), and the
model keeps its stored dtype (``torch_dtype="auto"``, AutoAWQ's default: float32 for SmolLM2; no fp16 compute on
CPU). AutoAWQ's packing still quantizes in and stores fp16 scales, as it always does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _fail(msg: str) -> int:
    print(f"peer_autoawq: error: {msg}", file=sys.stderr)
    return 2


def _read_ids(path: str) -> list[list[int]]:
    with open(path) as fh:
        ids = json.load(fh)
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        raise ValueError(f"{path}: expected a non-empty JSON list of non-empty lists of token ids")
    if not all(type(t) is int and t >= 0 for r in ids for t in r):
        raise ValueError(f"{path}: token ids must be non-negative integers")
    if len({len(r) for r in ids}) != 1:
        # AutoAWQ concatenates all samples and re-cuts them into max_calib_seq_len blocks; only equal
        # lengths survive that unchanged.
        raise ValueError(f"{path}: all calibration windows must have the same length")
    return ids


def _patch_autoawq() -> None:
    """The one CPU shim AutoAWQ 0.2.9 needs; it restores the semantics AutoAWQ has on its GPU path.

    ``AwqQuantizer._compute_best_scale`` snapshots the block it searches with
    ``org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}`` and, after trying each of the 20
    grid ratios, restores it with ``load_state_dict(org_sd)``. On a GPU ``.cpu()`` is a copy. On CPU it returns
    the very same tensor, and the trial step ``fc.weight.mul_(scales)`` scales that tensor in place, so the
    "snapshot" drifts: every ratio is scored on weights already multiplied by all earlier trial scales, the
    search picks nonsense, and the block keeps the compounded scaling (SmolLM2: loss 4.3 -> 13 on its own
    calibration text). The shim makes ``module2inspect.state_dict()`` return clones for the duration of that
    one call, i.e. the copy a GPU run gets; grid, loss, quantizer and everything else stay AutoAWQ's own.
    Checked on a tiny Llama: the shimmed run writes a checkpoint bit-identical to a run in which every
    ``Tensor.cpu()`` copies (the GPU behaviour everywhere), so no other ``.cpu()`` aliasing matters.
    """
    from awq.quantize.quantizer import AwqQuantizer

    original = AwqQuantizer._compute_best_scale
    if getattr(original, "_adaptkit_cpu_copy", False):
        return

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        own_state_dict = type(module2inspect).state_dict

        def copied_state_dict(*a, **k):
            return {n: t.clone() for n, t in own_state_dict(module2inspect, *a, **k).items()}

        module2inspect.state_dict = copied_state_dict  # instance attribute, shadows the method
        try:
            return original(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)
        finally:
            del module2inspect.state_dict

    _compute_best_scale._adaptkit_cpu_copy = True
    AwqQuantizer._compute_best_scale = _compute_best_scale


def main(argv=None) -> int:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("ids_json")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        return _fail(f"{args.model_dir}: not a local model folder (no config.json)")
    try:
        ids = _read_ids(args.ids_json)
    except (OSError, ValueError) as e:
        return _fail(str(e))

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    threads = args.threads or int(os.environ.get("BENCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    import awq
    from awq import AutoAWQForCausalLM
    from awq.utils.calib_data import get_calib_dataset
    from transformers import AutoTokenizer

    if os.environ.get("PEER_AUTOAWQ_NO_PATCH") != "1":  # "1": AutoAWQ unshimmed (only to show the CPU bug)
        _patch_autoawq()

    n_samples, seq_len = len(ids), len(ids[0])
    # AutoAWQ's own calibration preprocessing must hand back exactly our windows (no re-tokenizing, no drops).
    blocks = get_calib_dataset(data=ids, tokenizer=None, n_samples=n_samples, max_seq_len=seq_len)
    got = torch.cat(blocks, dim=0)
    if got.tolist() != ids:
        return _fail("AutoAWQ's get_calib_dataset changed the calibration windows")

    t1 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    # device_map=None: plain CPU load (AutoAWQ moves each block to get_best_device(), i.e. "cpu", itself).
    model = AutoAWQForCausalLM.from_pretrained(args.model_dir, device_map=None, local_files_only=True,
                                               attn_implementation="sdpa")
    dtype = str(next(model.model.parameters()).dtype).replace("torch.", "")
    quant_config = {"zero_point": True, "q_group_size": args.group_size, "w_bit": args.w_bit, "version": "GEMM"}
    t2 = time.perf_counter()
    model.quantize(tokenizer, quant_config=quant_config, calib_data=ids,
                   max_calib_samples=n_samples, max_calib_seq_len=seq_len)
    model.save_quantized(args.out_dir)
    t3 = time.perf_counter()
    print("PEER_RESULT " + json.dumps({"seconds": t3 - t2, "import_s": t1 - t0, "load_s": t2 - t1,
                                       "version": awq.__version__, "dtype": dtype,
                                       "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
