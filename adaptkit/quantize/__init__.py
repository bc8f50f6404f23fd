"""The ``quantize`` kind: the quantizer contract (:mod:`adaptkit.quantize.api`), the runner that validates,
plans, packs, streams and publishes (:mod:`adaptkit.quantize.runner`) and the calibration-text sources
(:mod:`adaptkit.quantize.calib`). Checkpoint formats live in :mod:`adaptkit.formats`; algorithms live in
plugins (``adaptkit-quant``: rtn, gptq, awq, nf4). Importing this package imports no torch."""
