"""The evaluate kind: contract (:mod:`adaptkit.evaluate.api`) and runner (:mod:`adaptkit.evaluate.runner`)."""
